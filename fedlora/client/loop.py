"""The local training loop: ``steps`` optimizer steps on seeded random batches of one partition."""

from __future__ import annotations

import torch

from fedlora.config import RunConfig
from fedlora.data.tokenize import collate, endless_batches
from fedlora.device import autocast
from fedlora.losses import loss_per_example


def make_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over exactly the parameters this strategy trains (fresh each round)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_steps(model: torch.nn.Module, rows: list[dict], task: str, pad_id: int, optimizer: torch.optim.Optimizer,
                steps: int, batch_size: int, generator: torch.Generator, device: torch.device,
                amp_dtype: torch.dtype | None = None) -> float:
    """Run ``steps`` steps of mean per-example loss; return the mean training loss over the steps."""
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    batches = endless_batches(len(rows), batch_size, generator)
    total = 0.0
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in next(batches)], pad_id).items()}
        labels = batch.pop("labels")
        with autocast(amp_dtype, device):
            logits = model(**batch).logits
        loss = loss_per_example(task, logits, labels).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item()
    model.eval()
    return total / steps
