"""Evaluate an adapted model on encoded rows: accuracy for classification, loss and perplexity for causal LM.

Causal-LM loss here is the token-level mean over all response tokens of the split
(``perplexity = exp(loss)``), the usual corpus perplexity.
"""

from __future__ import annotations

import math

import torch

from fedlora.data.tokenize import collate, ordered_batches
from fedlora.device import autocast
from fedlora.losses import classification_loss_per_example, token_nll


@torch.no_grad()
def evaluate_rows(model: torch.nn.Module, rows: list[dict], task: str, pad_id: int, batch_size: int,
                  device: torch.device, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """``{"eval_loss", "eval_accuracy"}`` (classification) or ``{"eval_loss", "eval_perplexity"}``."""
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for index in ordered_batches(len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in index], pad_id).items()}
        labels = batch.pop("labels")
        with autocast(amp_dtype, device):
            logits = model(**batch).logits
        if task == "classification":
            loss_sum += classification_loss_per_example(logits, labels).sum().item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += len(labels)
        else:
            nll, mask = token_nll(logits, labels)
            loss_sum += nll.sum().item()
            count += int(mask.sum().item())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
