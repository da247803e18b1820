"""LoRA-SB adapters on a torch model: ``y = W0 x + b + s·B R A x`` with only R trained.

For a target nn.Linear with weight W0 (d×k): B (d×r) and A (r×k) are fixed (from a
truncated SVD of a gradient estimate, identical on all clients) and R (r×r) trains.
Each factor is a bias-free nn.Linear (``lorasb_A``: k→r, ``lorasb_R``: r→r, ``lorasb_B``:
r→d), so the trainable R is an ordinary Linear weight that Opacus' per-sample hooks
support. State names follow peft's pattern: ``<module>.lorasb_A.weight`` (r×k),
``<module>.lorasb_R.weight`` (r×r), ``<module>.lorasb_B.weight`` (d×r).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.state import AdapterState, to_tensor

Factors = tuple[np.ndarray, np.ndarray, np.ndarray]
LORASB_A = ".lorasb_A.weight"
LORASB_B = ".lorasb_B.weight"
LORASB_R = ".lorasb_R.weight"


def _factor_layer(weight: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device, trainable: bool) -> nn.Linear:
    """A bias-free Linear whose weight (out×in) is ``weight``."""
    w = to_tensor(weight, dtype, device)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.weight.requires_grad_(trainable)
    return layer


class LoraSBLinear(nn.Module):
    """``base_layer(x) + s·((x Aᵀ) Rᵀ) Bᵀ`` around a frozen nn.Linear; only R is trainable.

    The factors are kept in float32 when the base layer is half precision (as peft does for
    LoRA) and the adapter output is cast back to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Linear, B: np.ndarray, R: np.ndarray, A: np.ndarray, scale: float) -> None:
        super().__init__()
        d, k = base_layer.weight.shape
        r = np.shape(R)[0]
        if np.shape(B) != (d, r) or np.shape(R) != (r, r) or np.shape(A) != (r, k):
            raise ValueError(f"LoRA-SB factors B{np.shape(B)} R{np.shape(R)} A{np.shape(A)} do not fit a {d}×{k} layer")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        dtype = base_layer.weight.dtype
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        device = base_layer.weight.device
        self.lorasb_A = _factor_layer(A, dtype, device, trainable=False)
        self.lorasb_R = _factor_layer(R, dtype, device, trainable=True)
        self.lorasb_B = _factor_layer(B, dtype, device, trainable=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        update = self.lorasb_B(self.lorasb_R(self.lorasb_A(x.to(self.lorasb_A.weight.dtype))))
        return out + (self.scale * update).to(out.dtype)


def _matches(name: str, targets: Sequence[str]) -> bool:
    """peft-style target matching: the module name equals a target or ends with ``.<target>``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def target_linears(model: nn.Module, target_names: Sequence[str]) -> dict[str, nn.Linear]:
    """The nn.Linear modules of ``model`` whose names match ``target_names`` by suffix."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, target_names)}
    if not found:
        raise ValueError(f"no nn.Linear module of the model matches targets {list(target_names)}")
    return found


def inject_lorasb(model: nn.Module, target_names: Sequence[str], rank: int, scale: float,
                  factors: Mapping[str, Factors], modules_to_save: Sequence[str] = ()) -> nn.Module:
    """Replace every target nn.Linear (matched by name suffix) with a :class:`LoraSBLinear`, in place.

    ``factors`` maps each matched module name to its (B, R0, A) of rank ``rank``. Afterwards
    only the R factors, and the parameters of modules matching ``modules_to_save`` (a
    classification head, say), require grad; everything else is frozen.
    """
    linears = target_linears(model, target_names)
    if set(factors) != set(linears):
        raise ValueError(f"LoRA-SB factors for {sorted(set(factors) ^ set(linears))[:3]} do not match the target modules")
    model.requires_grad_(False)
    for name, linear in linears.items():
        B, R, A = factors[name]
        if np.shape(R) != (rank, rank):
            raise ValueError(f"LoRA-SB R for {name!r} has shape {np.shape(R)}, expected ({rank}, {rank})")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoraSBLinear(linear, B, R, A, scale))
    for name, module in model.named_modules():
        if _matches(name, modules_to_save):
            module.requires_grad_(True)
    return model


def lorasb_state(model: nn.Module) -> AdapterState:
    """Every trainable tensor as float32 numpy: the ``lorasb_R`` factors plus e.g. a head."""
    return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def lorasb_frozen_state(model: nn.Module) -> AdapterState:
    """The fixed ``lorasb_B`` and ``lorasb_A`` factors as float32 numpy."""
    return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in model.named_parameters()
            if n.endswith((LORASB_A, LORASB_B))}


def load_lorasb_state(model: nn.Module, state: AdapterState) -> None:
    """Overwrite the model's trainable tensors with ``state``; exactly those tensors, with their shapes."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"LoRA-SB state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in own.items():
            shape = tuple(np.shape(state[name]))
            if shape != tuple(param.shape):
                raise ValueError(f"LoRA-SB tensor {name!r} has shape {shape}, the model expects {tuple(param.shape)}")
            param.copy_(to_tensor(state[name], param.dtype, param.device))


def lorasb_modules(state: AdapterState) -> list[str]:
    """Module prefixes that carry a ``lorasb_B`` factor in ``state``, sorted."""
    return sorted(k[: -len(LORASB_B)] for k in state if k.endswith(LORASB_B))


def lorasb_factors(frozen: AdapterState, R_state: AdapterState) -> dict[str, Factors]:
    """``{module: (B, R, A)}`` from the fixed factors and a state holding the R factors (for :func:`inject_lorasb`)."""
    return {m: (frozen[m + LORASB_B], R_state[m + LORASB_R], frozen[m + LORASB_A]) for m in lorasb_modules(frozen)}


def to_peft_lora(frozen: AdapterState, R_state: AdapterState, scale: float, peft_scale: float | None = None,
                 prefix: str = "") -> AdapterState:
    """The equivalent peft LoRA state: ``lora_B = (s/s_peft)·B R``, ``lora_A = A``, so s_peft·lora_B·lora_A = s·B R A.

    ``peft_scale`` is the scale α/r of the peft LoRA it will be loaded into (default: ``scale``).
    Other tensors of ``R_state`` (a head) are passed through. Every key gets ``prefix``
    (``"base_model.model."`` maps plain-model names onto a PeftModel's state names).
    """
    ratio = scale / (scale if peft_scale is None else peft_scale)
    out = {prefix + k: v for k, v in R_state.items() if not k.endswith(LORASB_R)}
    for m in lorasb_modules(frozen):
        B = np.asarray(frozen[m + LORASB_B], dtype=np.float64)
        R = np.asarray(R_state[m + LORASB_R], dtype=np.float64)
        out[prefix + m + LORA_B] = (ratio * (B @ R)).astype(np.float32)
        out[prefix + m + LORA_A] = np.asarray(frozen[m + LORASB_A], dtype=np.float32)
    return out


@contextmanager
def weights_requiring_grad(model: nn.Module, target_names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The weights of the target nn.Linear modules, with ``requires_grad`` on while inside (flags restored after)."""
    linears = target_linears(model, target_names)
    weights = {name: linear.weight for name, linear in linears.items()}
    flags = [w.requires_grad for w in weights.values()]
    try:
        for w in weights.values():
            w.requires_grad_(True)
        yield weights
    finally:
        for w, flag in zip(weights.values(), flags):
            w.requires_grad_(flag)


def gradient_estimate(model: nn.Module, batches: Iterable, target_names: Sequence[str],
                      loss_fn: Callable[[nn.Module, object], torch.Tensor]) -> dict[str, np.ndarray]:
    """G_m = (1/N) Σ_b ∂L(b)/∂W_m for every target nn.Linear weight W_m, over N batches (float32 numpy).

    ``loss_fn(model, batch)`` returns the scalar loss. The target weights require grad only
    while this runs (:func:`weights_requiring_grad`) and gradients are taken with
    ``torch.autograd.grad``, so no ``.grad`` of any parameter is touched. The model's
    train/eval mode is the caller's choice (dropout makes the estimate random).
    """
    with weights_requiring_grad(model, target_names) as weights:
        sums = [torch.zeros(w.shape, dtype=torch.float64, device=w.device) for w in weights.values()]
        count = 0
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), list(weights.values()))
            for acc, g in zip(sums, grads):
                acc += g.to(torch.float64)
            count += 1
    if count == 0:
        raise ValueError("gradient_estimate needs at least one batch")
    return {name: (acc / count).to("cpu", torch.float32).numpy() for name, acc in zip(weights, sums)}
