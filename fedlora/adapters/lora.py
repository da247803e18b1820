"""Inject LoRA into a frozen base model with peft; read and write the adapter state.

The adapter state is a flat ``{name: float32 ndarray}`` in peft's saved-adapter naming
(``…query.lora_A.weight``, ``…query.lora_B.weight``, plus the classification head for
sequence classification, which peft trains in full as a ``modules_to_save`` module). For
a module with frozen weight W0 (d×k) the adapted forward is ``W0 x + (α/r)·B A x`` with
A (r×k) and B (d×r).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import peft
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedlora.adapters.stack import is_stack, stack_terms
from fedlora.adapters.state import LORA_A, LORA_B, AdapterState, to_tensor
from fedlora.config import LoraConfig
from fedlora.models.loading import load_base_model
from fedlora.process_cache import process_cache

#: prefix of every state name of a PeftModel around a plain model (LoRA-SB state names carry none)
PEFT_PREFIX = "base_model.model."
#: a dense d×k base-weight update in a merge record (``<module>.base_delta.weight``), sent when smaller than its factors
DENSE_DELTA = ".base_delta.weight"


def peft_config(cfg: LoraConfig, task: str) -> peft.LoraConfig:
    """peft's LoraConfig for a fedlora LoRA config; ``targets='auto'`` uses peft's per-architecture default."""
    targets = None if cfg.targets == "auto" else [t.strip() for t in cfg.targets.split(",") if t.strip()]
    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )


def inject_lora(model: torch.nn.Module, cfg: LoraConfig, task: str, seed: int) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; A is drawn from ``seed``, B starts at zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_config(cfg, task))
        except ValueError as err:  # peft's message for unknown target modules
            raise ValueError(f"lora.targets={cfg.targets!r} does not fit this model: {err}") from err


@process_cache(maxsize=6)
def cached_lora_model(model_name: str, task: str, num_labels: int, cfg: LoraConfig, seed: int, device: str,
                      variant: str = "shared") -> PeftModel:
    """The adapted model for this process, built once and reused across rounds.

    Every use loads a full adapter state into it first (:func:`load_adapter_state`), so
    what one round leaves behind never leaks into the next. ``variant`` keeps models
    whose base weights a strategy changes (FLoRA merges) apart from the others. The
    adapter as injected (A from ``seed``, B = 0) stays available as ``model.initial_state``.
    """
    model = inject_lora(load_base_model(model_name, task, num_labels), cfg, task, seed).to(device)
    model.initial_state = adapter_state(model)
    return model


def set_trainable(model: PeftModel, train_a: bool = True, train_b: bool = True) -> list[torch.nn.Parameter]:
    """Make the adapter trainable (LoRA A only if ``train_a``, B only if ``train_b``, the head always);
    returns the trainable parameters."""
    params = []
    for name, param in model.named_parameters():
        is_adapter = "lora_" in name or "modules_to_save" in name
        frozen = ("lora_A" in name and not train_a) or ("lora_B" in name and not train_b)
        param.requires_grad_(is_adapter and not frozen)
        if param.requires_grad:
            params.append(param)
    return params


def adapter_state(model: PeftModel) -> AdapterState:
    """The trainable adapter tensors as float32 numpy arrays (bf16 cannot travel in an ArrayRecord)."""
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Overwrite the model's adapter with ``state``; every adapter tensor must be present with its shape."""
    own = get_peft_model_state_dict(model)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"adapter state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"adapter tensor {key!r} has shape {state[key].shape}, the model expects {tuple(value.shape)}")
    device = next(model.parameters()).device
    tensors = {k: to_tensor(v, own[k].dtype, device) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"peft did not place adapter tensors {unexpected[:3]}")


def lora_modules(state: AdapterState) -> list[str]:
    """Module prefixes that carry a LoRA pair (A and B) in ``state``, sorted."""
    return sorted(k[: -len(LORA_A)] for k in state if k.endswith(LORA_A) and k[: -len(LORA_A)] + LORA_B in state)


def scaling(cfg: LoraConfig) -> float:
    """The LoRA scale s = α / r."""
    return cfg.alpha / cfg.rank


def merge_into_base(model: PeftModel, update: AdapterState) -> None:
    """W0 ← W0 + B·A for every LoRA pair in ``update`` (scale already folded into the factors),
    W0 ← W0 + Σ_i c_i B_i A_i for a weighted stack (:mod:`fedlora.adapters.stack`), and W0 ← W0 + D
    for every dense ``<module>.base_delta.weight`` D.

    Module prefixes are peft state names (``base_model.model.…query``), which are also the
    module paths inside the PeftModel; the update is added to that module's frozen base weight
    in place, in the weight's device and dtype.
    """
    with torch.no_grad():
        for module in lora_modules(update):
            weight = model.get_submodule(module).base_layer.weight
            B, A = (to_tensor(update[module + suffix], weight.dtype, weight.device) for suffix in (LORA_B, LORA_A))
            weight.addmm_(B, A)  # W0 += B·A accumulated in place: no dense d×k temporary
        for module, terms in (stack_terms(update) if is_stack(update) else {}).items():
            weight = model.get_submodule(module).base_layer.weight
            for B, A, c in terms:  # W0 += c·B·A: the coefficient enters the product, A is not copied scaled
                weight.addmm_(to_tensor(B, weight.dtype, weight.device), to_tensor(A, weight.dtype, weight.device), alpha=c)
        for key in (k for k in update if k.endswith(DENSE_DELTA)):
            weight = model.get_submodule(key[: -len(DENSE_DELTA)]).base_layer.weight
            weight.add_(to_tensor(update[key], weight.dtype, weight.device))


def fresh_lora_state(model: PeftModel, seed: int | tuple[int, ...]) -> AdapterState:
    """A new LoRA as peft initialises one: A ~ U(−1/√k, 1/√k) (Kaiming-uniform, a=√5), B = 0, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in model.initial_state.items():
        if key.endswith(LORA_A):
            bound = 1.0 / np.sqrt(value.shape[1])
            state[key] = rng.uniform(-bound, bound, size=value.shape).astype(np.float32)
        elif key.endswith(LORA_B):
            state[key] = np.zeros_like(value)
    return state


def bring_base_to(model: PeftModel, version: int, merge_of: Callable[[int], AdapterState | None]) -> None:
    """Apply the merges of rounds ``model.base_version+1 … version`` to the model's base weights.

    Raises when a needed merge is unknown (the node missed it and was not caught up) or when
    the model is already past ``version`` — training on a stale or foreign base is refused.
    """
    applied = getattr(model, "base_version", 0)
    if applied > version:
        raise RuntimeError(f"FLoRA: cached base is at round {applied}, newer than the requested {version}")
    for j in range(applied + 1, version + 1):
        record = merge_of(j)
        if record is None:
            raise RuntimeError(f"FLoRA: this node lacks the merge of round {j}; refusing to train on a stale base")
        merge_into_base(model, record)
        model.base_version = j
