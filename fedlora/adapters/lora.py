"""Inject LoRA into a frozen base model with peft; read and write the adapter state.

The adapter state is a flat ``{name: float32 ndarray}`` in peft's saved-adapter naming
(``…query.lora_A.weight``, ``…query.lora_B.weight``, plus the classification head for
sequence classification, which peft trains in full as a ``modules_to_save`` module). For
a module with frozen weight W0 (d×k) the adapted forward is ``W0 x + (α/r)·B A x`` with
A (r×k) and B (d×r).

Adapters are float32 whatever the base's dtype or quantization, and start from the seeded
state of :mod:`fedlora.adapters.initial`. A process keeps one resident base per model, spec
and variant (:class:`SharedBase`): the clients it serves differ only in their adapters, which
are swapped on that one base (a named peft adapter per LoRA shape, one at a time).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import peft
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import ModulesToSaveWrapper
from transformers import PreTrainedModel

from fedlora.adapters.stack import is_stack, stack_terms
from fedlora.adapters.initial import DEFAULT_INIT_STD, seeded_adapter_state
from fedlora.adapters.state import LORA_A, LORA_B, AdapterState, to_tensor
from fedlora.config import LoraConfig
from fedlora.models.loading import load_base_model
from fedlora.models.precision import BaseSpec
from fedlora.process_cache import process_cache

#: prefix of every state name of a PeftModel around a plain model (LoRA-SB state names carry none)
PEFT_PREFIX = "base_model.model."
#: a dense d×k base-weight update in a merge record (``<module>.base_delta.weight``), sent when smaller than its factors
DENSE_DELTA = ".base_delta.weight"
#: the adapter of a model with one (peft saves that one at the top of its directory)
DEFAULT_ADAPTER = "default"


def peft_config(cfg: LoraConfig, task: str) -> peft.LoraConfig:
    """peft's LoraConfig for a fedlora LoRA config; ``targets='auto'`` uses peft's per-architecture default."""
    targets = None if cfg.targets == "auto" else [t.strip() for t in cfg.targets.split(",") if t.strip()]
    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )


def inject_lora(model: PreTrainedModel | PeftModel, cfg: LoraConfig, task: str, seed: int,
                adapter: str = DEFAULT_ADAPTER) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter named ``adapter`` (or add it to a PeftModel) and make it the active one.

    The adapter is float32 whatever the base (:func:`_float32_adapter`) and holds the seeded
    initial state of ``seed`` (A random, B = 0, the head), kept as ``model.initial_state``.
    A base on the meta device (:func:`fedlora.models.loading.skeleton_base_model`) gets a real
    adapter on the CPU: the server's model when it evaluates nothing.
    """
    with torch.random.fork_rng(devices=[]):  # peft draws an init we overwrite: keep the caller's RNG as it was
        try:
            if isinstance(model, PeftModel):
                model.add_adapter(adapter, peft_config(cfg, task))
            else:
                model = get_peft_model(model, peft_config(cfg, task), adapter_name=adapter)
        except ValueError as err:  # peft's message for unknown target modules
            raise ValueError(f"lora.targets={cfg.targets!r} does not fit this model: {err}") from err
    model.set_adapter(adapter)
    _float32_adapter(model, adapter)
    model.initial_state = initial_state(model, seed)
    load_adapter_state(model, model.initial_state)
    return model


def initial_state(model: PeftModel, seed: int) -> AdapterState:
    """The seeded initial state (:func:`~fedlora.adapters.initial.seeded_adapter_state`) of the active adapter."""
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=model.active_adapter).items()}
    return seeded_adapter_state(shapes, seed, getattr(model.config, "initializer_range", DEFAULT_INIT_STD))


def _of_adapter(name: str, adapter: str) -> bool:
    """Whether parameter ``name`` belongs to adapter ``adapter`` (its LoRA factors or its copy of the head)."""
    return ("lora_" in name or "modules_to_save" in name) and f".{adapter}." in name


def inputs_in_own_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook: floating inputs cast to the dtype of ``module``'s parameters."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _float32_adapter(model: PeftModel, adapter: str) -> None:
    """Every tensor of ``adapter`` in float32 (allocated on the CPU where the base is on the meta device), and its
    head copy casting its input to its own dtype: adapters, their gradients and all that travels stay float32
    whatever the base's dtype (peft's LoRA layers cast their own input)."""
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not _of_adapter(f"{module_name}.{name}", adapter):
                continue
            if param.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.zeros(param.shape, dtype=torch.float32),
                                                              requires_grad=param.requires_grad)
            elif param.dtype != torch.float32:
                param.data = param.data.float()
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            module.modules_to_save[adapter].register_forward_pre_hook(inputs_in_own_dtype)


def adapter_name(cfg: LoraConfig) -> str:
    """The peft adapter name of a LoRA shape on a shared base: ``r<rank>_<digest of the LoRA config>``."""
    return f"r{cfg.rank}_{hashlib.sha1(repr(cfg).encode()).hexdigest()[:10]}"


class SharedBase:
    """One resident frozen base, and on it the adapter of the client this process is serving.

    Clients differ only in their adapters. The PeftModel around the base holds one adapter, of
    the LoRA shape the current client trains: clients of the same shape reuse it, a client of
    another shape (its own rank, say) replaces it by a named peft adapter of its shape — the base
    is never rebuilt. :meth:`use` returns the PeftModel, valid until the next :meth:`use` (a
    process serves its clients one at a time, and every use loads a full adapter state first, so
    nothing leaks between them).
    """

    def __init__(self, base: PreTrainedModel, task: str) -> None:
        self.base = base
        self.task = task
        self.model: PeftModel | None = None
        self.initial: dict[tuple[str, int], AdapterState] = {}

    def use(self, cfg: LoraConfig, seed: int) -> PeftModel:
        """The model with the adapter of ``cfg`` (only) and ``model.initial_state`` its seeded state under ``seed``."""
        name = adapter_name(cfg)
        key = (name, seed)
        if self.model is None or name not in self.model.peft_config:
            previous = self.model.active_adapter if self.model is not None else None
            self.model = inject_lora(self.model or self.base, cfg, self.task, seed, name)
            if previous is not None:
                self.model.delete_adapter(previous)
                self.model.set_adapter(name)
            self.initial[key] = self.model.initial_state
        elif key not in self.initial:
            self.initial[key] = initial_state(self.model, seed)
        self.model.initial_state = self.initial[key]
        return self.model


@process_cache(maxsize=4)
def cached_lora_model(model_name: str, task: str, num_labels: int, spec: BaseSpec,
                      variant: str = "shared") -> SharedBase:
    """This process's resident base for (model, task, spec, variant), loaded once and reused across rounds and clients.

    ``variant`` keeps bases whose weights a strategy changes (FLoRA merges) apart from the
    shared one; :meth:`SharedBase.use` gives the adapted model of one LoRA shape.
    """
    return SharedBase(load_base_model(model_name, task, num_labels, spec), task)


def set_trainable(model: PeftModel, train_a: bool = True, train_b: bool = True) -> list[torch.nn.Parameter]:
    """Make the active adapter trainable (LoRA A only if ``train_a``, B only if ``train_b``, the head always) and
    everything else frozen; returns the trainable parameters."""
    params = []
    for name, param in model.named_parameters():
        is_adapter = _of_adapter(name, model.active_adapter)
        frozen = ("lora_A" in name and not train_a) or ("lora_B" in name and not train_b)
        param.requires_grad_(is_adapter and not frozen)
        if param.requires_grad:
            params.append(param)
    return params


def adapter_state(model: PeftModel) -> AdapterState:
    """The active adapter's tensors as float32 numpy arrays (bf16 cannot travel in an ArrayRecord)."""
    own = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in own.items()}


def load_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Overwrite the active adapter with ``state``; every adapter tensor must be present with its shape.

    Each tensor goes to its parameter's own device (a model spread over several GPUs has several)."""
    own = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"adapter state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"adapter tensor {key!r} has shape {state[key].shape}, the model expects {tuple(value.shape)}")
    tensors = {k: to_tensor(v, own[k].dtype, own[k].device) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors, adapter_name=model.active_adapter)
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
    """A new LoRA (no head) of the active adapter's shape, drawn from ``seed`` as :mod:`fedlora.adapters.initial` draws
    one: A ~ U(−1/√k, 1/√k) (Kaiming-uniform, a=√5), B = 0."""
    lora = {k: v.shape for k, v in model.initial_state.items() if k.endswith((LORA_A, LORA_B))}
    return seeded_adapter_state(lora, seed)


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
