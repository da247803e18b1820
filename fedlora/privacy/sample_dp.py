"""Sample-level DP-SGD for one client's local steps (Opacus 1.6, ``hooks`` or ``ghost`` mode).

One step on a Poisson batch S (each of the client's n rows kept with probability
q = B/n, B the configured batch size) with per-example losses ℓ_i (token-mean per
sequence for causal LM, :func:`fedlora.losses.loss_per_example`) applies

    g = ( Σ_{i∈S} g_i · min(1, C / (‖g_i‖ + 1e-6)) + N(0, σ²C² I) ) / (q·n),    g_i = ∇ℓ_i,

to the trainable tensors only, where ‖g_i‖ is the joint L2 norm over all of them
(Opacus "flat" clipping; 1e-6 is Opacus's stabiliser) and the denominator is the
*expected* batch size q·n, not |S|. About ``loss_reduction="mean"`` in Opacus 1.6: the
loss passed to backward is the mean over the *actual* batch, ℓ̄ = (1/|S|) Σ ℓ_i; Opacus's
per-sample hooks multiply the backprops by |S| (the batch length they see), which turns
∇ℓ̄ back into the per-example g_i, and the DP optimizer then divides the clipped, noised
sum by ``expected_batch_size`` = q·n. So the mean over the actual batch is correct, the
update does not depend on |S| except through the sum, and it matches the accountant's
subsampled Gaussian mechanism with noise multiplier σ and rate q.

``ghost`` mode computes ‖g_i‖ without materialising g_i (first backward of ℓ̄ with
norm hooks), then backpropagates Σ c_i ℓ_i with c_i the clip factors and hooks off; it
needs Opacus's ``DPOptimizerFastGradientClipping`` and the per-example losses wrapped in
``DPTensorFastGradientClipping`` instead of a plain ``loss.backward()``.

The pieces are the ones ``PrivacyEngine.make_private`` assembles — per-sample hooks
(the hooks classes it uses with ``wrap_model=False``, so the model is not wrapped),
the flat-clipping DP optimizer, Poisson sampling — put together directly because
``make_private`` needs a DataLoader, sets q = 1/len(loader) = 1/⌈n/B⌉ rather than B/n,
and keeps an accountant of its own. Everything Opacus adds is removed afterwards, so the
cached model object stays a plain module for later rounds and non-DP use. Privacy
accounting is the caller's job: the result carries the q and the step count that, with
σ, form the round's :class:`fedlora.privacy.accounting.AccountantEntry`.

Gradient checkpointing (``model.gradient-checkpointing``) works with the per-sample hooks in
its reentrant form only (:mod:`fedlora.models.checkpointing`: the hooks record a layer's
activations once, in the recomputation the backward pass runs); a model that checkpoints
otherwise is refused, since Opacus would not see the recomputed activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators.module_validator import ModuleValidator

from fedlora.losses import batch_losses
from fedlora.models.checkpointing import non_reentrant_checkpointing
from fedlora.privacy.sampling import noise_generator, poisson_batches, sample_rate_of

GRAD_SAMPLE_MODES = ("hooks", "ghost")
OPTIMIZER_ATTRS = ("summed_grad",)
MODULE_ATTRS = ("activations", "max_batch_len")
#: PyTorch's notice when a hooked module's input needs no grad (LoRA A sees frozen activations);
#: Opacus only uses the gradient w.r.t. the module output, so the notice is expected and harmless.
BENIGN_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class DPTrainResult(NamedTuple):
    """What a DP round produced: the mean loss over non-empty batches, and q and the step count for the accountant."""

    mean_loss: float
    sample_rate: float
    steps: int


def check_frozen_embeddings_and_norms(model: torch.nn.Module) -> None:
    """Raise ValueError if an embedding or a normalisation layer has a trainable parameter."""
    offenders = [
        name for name, module in model.named_modules()
        if (isinstance(module, torch.nn.Embedding) or "Norm" in type(module).__name__)
        and any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    if offenders:
        raise ValueError(f"DP training keeps embeddings and norm layers frozen, but these are trainable: {offenders[:5]}")


def _attach(model: torch.nn.Module, mode: str, max_grad_norm: float) -> AbstractGradSampleHooks:
    if mode == "ghost":
        return GradSampleHooksFastGradientClipping(model, batch_first=True, loss_reduction="mean", strict=True,
                                                   max_grad_norm=max_grad_norm, use_ghost_clipping=True)
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
    hooks.forbid_grad_accumulation()
    return hooks


def _detach(model: torch.nn.Module, hooks: AbstractGradSampleHooks, params: list[torch.nn.Parameter]) -> None:
    """Remove every hook and every attribute Opacus added to the model and its parameters."""
    hooks.cleanup()
    for p in params:
        p.grad = None
        for attr in OPTIMIZER_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for module in model.modules():
        for attr in MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)


def _noise_only_step(optimizer: DPOptimizer, params: list[torch.nn.Parameter], mode: str) -> None:
    """An empty Poisson batch still costs a step: the update is noise / (q·n) alone."""
    for p in params:
        if mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _assert_changed(before: list[torch.Tensor], params: list[torch.nn.Parameter]) -> None:
    if all(torch.equal(b, p.detach()) for b, p in zip(before, params)):
        raise RuntimeError(
            "DP-SGD step left the adapter unchanged: the optimizer does not update the parameters that "
            "Opacus computes gradients for (the known silent failure when the optimizer or the adapter is "
            "built in the wrong order, or the model was moved after the optimizer was created)"
        )


def _step(model: torch.nn.Module, rows: list[dict], indices: list[int], task: str, pad_id: int,
          optimizer: DPOptimizer, hooks: AbstractGradSampleHooks, params: list[torch.nn.Parameter], mode: str,
          device: torch.device, amp_dtype: torch.dtype | None) -> float | None:
    """One DP-SGD step on the rows ``indices``; returns the batch's mean loss (None for an empty batch)."""
    optimizer.zero_grad(set_to_none=True)
    if not indices:
        _noise_only_step(optimizer, params, mode)
        return None
    per_example = batch_losses(model, [rows[i] for i in indices], task, pad_id, device, amp_dtype)
    if mode == "ghost":
        DPTensorFastGradientClipping(hooks, optimizer, per_example, "mean").backward()
    else:
        per_example.mean().backward()
    optimizer.step()
    return per_example.mean().item()


def dp_train_steps(model: torch.nn.Module, rows: list[dict], task: str, pad_id: int,
                   optimizer_factory: OptimizerFactory, steps: int, batch_size: int, noise_multiplier: float,
                   max_grad_norm: float, grad_sample_mode: str, generator: torch.Generator, device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> DPTrainResult:
    """Run ``steps`` DP-SGD steps on Poisson batches of ``rows``; return loss, q and steps taken.

    Preconditions: ``model`` is on ``device`` with adapters injected, and exactly the
    tensors this strategy trains have ``requires_grad`` (B only for FFA-LoRA, R only for
    LoRA-SB, LoRA A/B and the head for FedAvg); embeddings and norm layers are frozen.
    ``optimizer_factory`` builds a fresh optimizer over the given trainable parameters.
    Randomness comes from ``generator``: one draw seeds the noise generator
    (:func:`fedlora.privacy.sampling.noise_generator`), then one Poisson mask per step.
    ``amp_dtype`` may be bf16 or None (per-example gradients are cast to the parameters'
    dtype before clipping); fp16 needs loss scaling, which would scale the per-example
    gradients before clipping, and is refused. Layers may checkpoint (reentrant only, see the
    module docstring). Raises RuntimeError if the
    first step that should move the adapter (a non-empty batch, or σ > 0) leaves it unchanged.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r} is not supported; use one of {', '.join(GRAD_SAMPLE_MODES)}")
    if amp_dtype == torch.float16:
        raise ValueError("DP-SGD does not run under fp16 autocast (loss scaling breaks per-example clipping); use bf16 or fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("DP training needs at least one trainable parameter; none has requires_grad")
    if any(p.device.type != device.type for p in params):
        raise ValueError(f"move the model to {device} before DP training (and before building the optimizer)")
    check_frozen_embeddings_and_norms(model)
    unseen = non_reentrant_checkpointing(model)
    if unseen:
        raise ValueError(f"DP training needs reentrant gradient checkpointing (use_reentrant=True), which "
                         f"{unseen[:3]} do not use; turn it on with fedlora.models.checkpointing.set_gradient_checkpointing")
    sample_rate = sample_rate_of(batch_size, len(rows))
    noise = noise_generator(generator, device)
    batches = poisson_batches(len(rows), sample_rate, generator)

    model.train()
    ModuleValidator.validate(model, strict=True)
    optimizer = optimizer_factory(params)
    hooks = _attach(model, grad_sample_mode, max_grad_norm)
    dp_optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode)(
        optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=sample_rate * len(rows), loss_reduction="mean", generator=noise,
    )
    losses: list[float] = []
    checked = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=BENIGN_HOOK_WARNING)
            for _ in range(steps):
                before = None if checked else _snapshot(params)
                indices = next(batches)
                loss = _step(model, rows, indices, task, pad_id, dp_optimizer, hooks, params, grad_sample_mode,
                             device, amp_dtype)
                if loss is not None:
                    losses.append(loss)
                if before is not None and (indices or noise_multiplier > 0):
                    _assert_changed(before, params)
                    checked = True
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        _detach(model, hooks, params)
        model.eval()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return DPTrainResult(mean_loss=mean_loss, sample_rate=sample_rate, steps=steps)
