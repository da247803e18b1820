"""Task losses, per example, so that one example's loss never depends on another's length.

Causal LM: for sequence i with response-token set T_i (labels != -100 after the shift),
``loss_i = (1/|T_i|) Σ_{t∈T_i} −log p(y_t | y_<t)``; the batch loss is the mean of loss_i.
This per-sequence form is what per-sample DP clipping needs, and for training without DP
it weights every example equally whatever its length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlora.data.tokenize import IGNORE, collate
from fedlora.device import autocast


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (batch × len) of next-token prediction and the mask of counted tokens.

    Position t predicts label t+1: the labels are shifted left (the last position predicts
    nothing), never the logits, so the batch × len × vocab logits are not copied — for a 49k
    vocabulary that copy and its gradient were most of a step's extra memory.
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = shift_labels != IGNORE
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view_as(shift_labels)
    return nll, mask


def causal_lm_loss_per_sequence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL inside each sequence (shape: batch)."""
    nll, mask = token_nll(logits, labels)
    return nll.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def classification_loss_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def loss_per_example(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return classification_loss_per_example(logits, labels)
    return causal_lm_loss_per_sequence(logits, labels)


def batch_losses(model: torch.nn.Module, rows: list[dict], task: str, pad_id: int, device: torch.device,
                 amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The loss of each of ``rows`` (collated, on ``device``, forward under ``amp_dtype`` autocast).

    The logits (batch × length × vocabulary: the largest activation of a causal LM) are
    referenced nowhere once the loss exists, so the backward pass frees them as it goes.
    """
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    labels = batch.pop("labels")
    with autocast(amp_dtype, device):
        logits = model(**batch).logits
    return loss_per_example(task, logits, labels)
