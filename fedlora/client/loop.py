"""The local training loop: ``steps`` optimizer steps on seeded random batches of one partition."""

from __future__ import annotations

import torch

from fedlora.config import RunConfig
from fedlora.data.tokenize import endless_batches
from fedlora.losses import batch_losses


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
        loss = batch_losses(model, [rows[i] for i in next(batches)], task, pad_id, device, amp_dtype).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item()
    model.eval()
    return total / steps
