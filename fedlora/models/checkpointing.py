"""Gradient (activation) checkpointing of a base's layers, in the one form Opacus' per-sample hooks work with.

With checkpointing, each transformer layer keeps only its input in the forward pass and runs
again in the backward pass. It must be the *reentrant* form (``use_reentrant=True``): its first
forward runs without autograd, so Opacus' forward hooks (which record a layer's activations
only when gradients are enabled) skip it and record exactly once, in the recomputation that
the backward pass runs; the non-reentrant form recomputes through saved-tensor hooks that
Opacus cannot see. Reentrant checkpointing needs inputs that require grad to backpropagate
through a layer of frozen weights: the input embeddings' output is made to require grad.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedModel

REENTRANT = {"use_reentrant": True}


def set_gradient_checkpointing(model: PeftModel | PreTrainedModel, on: bool) -> None:
    """Turn reentrant checkpointing of every layer of ``model``'s base on or off (idempotent)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if on == checkpointing_on(base):
        return
    if on:
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5
            enable(activation_checkpointing_kwargs=REENTRANT)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)
        base.config.use_cache = False
        base.enable_input_require_grads()
    else:
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()
        base.disable_input_require_grads()


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` checkpoints its forward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def non_reentrant_checkpointing(model: torch.nn.Module) -> list[str]:
    """The modules of ``model`` that checkpoint without ``use_reentrant=True`` (Opacus cannot see their
    recomputation)."""
    found = []
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant") is not True:
                found.append(name or type(module).__name__)
    return found
