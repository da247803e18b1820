"""Task losses, per example, so that one example's loss never depends on another's length.

Causal LM: for sequence i with response-token set T_i (labels != -100 after the shift),
``loss_i = (1/|T_i|) Σ_{t∈T_i} −log p(y_t | y_<t)``; the batch loss is the mean of loss_i.
This per-sequence form is what per-sample DP clipping needs, and for training without DP
it weights every example equally whatever its length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlora.data.tokenize import IGNORE


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (batch × len−1) of next-token prediction and the mask of counted tokens."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(shift_labels)
    return nll * mask, mask


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
