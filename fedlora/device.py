"""Device and precision: CUDA when present (bf16 or fp16 autocast), CPU otherwise (fp32); what a device can hold."""

from __future__ import annotations

import contextlib
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def base_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype a frozen base is loaded in: ``auto`` → bf16 on a CUDA device that supports it, else fp32."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[requested]


def visible_gpus() -> list[torch.device]:
    """Every CUDA device this process sees (``CUDA_VISIBLE_DEVICES`` decides which a site runner gets)."""
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def device_capacity(device: torch.device, spread: bool = False) -> int:
    """Bytes of memory ``device`` has: a GPU's total (every visible GPU's with ``spread``), or the machine's RAM."""
    if device.type == "cuda":
        gpus = visible_gpus() if spread else [device if device.index is not None else torch.device("cuda", 0)]
        return sum(torch.cuda.get_device_properties(gpu).total_memory for gpu in gpus)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
