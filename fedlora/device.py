"""Device and precision: CUDA when present (bf16 or fp16 autocast), CPU otherwise (fp32)."""

from __future__ import annotations

import contextlib

import torch


def pick_device(requested: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; an explicit CUDA device must exist."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} was requested but CUDA is not available on this machine")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32). ``auto`` picks bf16 on CUDA where supported, else fp16."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
