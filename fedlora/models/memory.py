"""A client's memory, predicted before anything loads, and the knobs that would make a run fit.

For a base with Q quantizable weights (the ``nn.Linear`` layers bitsandbytes would quantize),
D other parameters, P trainable adapter parameters (LoRA factors and a head, always float32),
batch B × length L (T = B·L tokens), hidden size h, MLP width I, n layers, a heads, output
width V (the vocabulary for a causal LM, the labels for classification), weights of w bytes and
activations of b bytes (the base dtype, or the autocast dtype on CUDA), the estimate is

    weights      = Q·q + D·w            q = w, 0.516 (nf4: 4 bits + double-quantized block scales), 1 (int8)
    adapters     = 4P,  gradients = 4P,  optimizer = 8P (AdamW's two moments; SGD keeps none)
    activations  = n·layer + T·h·b + logits                       without checkpointing
                 = n·T·h·b + layer + T·h·b + logits               with it (layer inputs, one layer recomputed)
    layer        = (T·(10h + 3I) + 2·B·a·L²)·b       (a layer's saved tensors, attention probabilities included)
    logits       = T·V·(b + 8) for a causal LM        (the logits, their float32 copy and its gradient),
                 = B·V·(b + 8) for a classifier
    DP (hooks)   = 4·B·P + 4·T·Σ(k + r)              (per-sample gradients; the inputs Opacus keeps at every
                                                      LoRA module of k inputs and rank r)
    DP (ghost)   = 4·T·Σ(k + r)
    runtime      = 0.5 GiB (the CUDA context, or the process's own torch runtime on a CPU)

Evaluation (the server's model) keeps no gradients, optimizer or saved activations: two
layers in flight and the logits. The terms are upper-end estimates of what PyTorch keeps
(``benchmarks/client_memory.py`` compares them with measured peaks); they are meant to
refuse a run that cannot fit at start, with a line naming what would make it fit, rather
than minutes later with an out-of-memory error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

GIB = 2**30
RUNTIME = GIB // 2
#: bytes per quantized weight (4-bit NF4 with its double-quantized absmax per 64-block; 8-bit)
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs of a model: parameter counts (see the module docstring) and the architecture's sizes."""

    quantizable: int
    dense: int
    trainable: int
    adapter_io: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    outputs: int
    per_token_outputs: bool


@dataclass(frozen=True)
class Workload:
    """How a model is held and used: bytes per weight and per activation, quantization, batch × length, checkpointing,
    optimizer, DP mode (``none``, ``hooks``, ``ghost``), and whether it trains or only evaluates."""

    weight_bytes: int
    activation_bytes: int
    quantization: str
    batch: int
    length: int
    checkpointing: bool
    optimizer: str
    dp: str
    training: bool = True


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's parts in bytes (see the module docstring)."""

    weights: float
    adapters: float
    gradients: float
    optimizer: float
    dp: float
    activations: float
    runtime: float = RUNTIME

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))

    def describe(self) -> str:
        """``X GiB (weights …, adapters …, …)``: the parts that are not zero."""
        parts = ", ".join(f"{f.name} {size(getattr(self, f.name))}" for f in dataclasses.fields(self)
                          if getattr(self, f.name) > 0)
        return f"{size(self.total)} ({parts})"


def size(num_bytes: float) -> str:
    """``1.23 GiB`` from 0.1 GiB up, else ``12.3 MiB``."""
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.1f} MiB"


def estimate(facts: ModelFacts, work: Workload) -> MemoryEstimate:
    """The memory of one client (or, with ``work.training`` False, one evaluating model): the module docstring."""
    b, tokens = work.activation_bytes, work.batch * work.length
    per_weight = QUANTIZED_BYTES.get(work.quantization, work.weight_bytes)
    weights = facts.quantizable * per_weight + facts.dense * work.weight_bytes
    layer = (tokens * (10 * facts.hidden + 3 * facts.intermediate) + 2 * work.batch * facts.heads * work.length**2) * b
    rows = tokens if facts.per_token_outputs else work.batch
    logits = rows * facts.outputs * (b + 8)
    adapters = 4.0 * facts.trainable
    if not work.training:
        return MemoryEstimate(weights, adapters, 0.0, 0.0, 0.0, 2 * layer + logits)
    if work.checkpointing:
        saved = facts.layers * tokens * facts.hidden * b + layer
    else:
        saved = facts.layers * layer
    activations = saved + tokens * facts.hidden * b + logits
    optimizer = 8.0 * facts.trainable if work.optimizer == "adamw" else 0.0
    dp = 0.0
    if work.dp != "none":
        dp = 4.0 * tokens * facts.adapter_io + (4.0 * work.batch * facts.trainable if work.dp == "hooks" else 0.0)
    return MemoryEstimate(weights, adapters, 4.0 * facts.trainable, optimizer, dp, activations)


def _halvings(value: int) -> list[int]:
    """value/2, value/4, … down to 1."""
    out = []
    while value > 1:
        value //= 2
        out.append(value)
    return out


def knobs_that_fit(facts: ModelFacts, work: Workload, capacity: float,
                   spread_capacity: float | None = None) -> list[str]:
    """Config changes that would bring the estimate within ``capacity`` bytes: each single change that suffices, else
    every memory-saving switch together with the largest batch that fits (empty: nothing does).

    ``spread_capacity`` is what ``model.device-map = 'spread'`` would offer (every visible GPU), when it would
    offer more.
    """
    def fits(changed: Workload, cap: float = capacity) -> bool:
        return estimate(facts, changed).total <= cap

    switches: list[tuple[str, Workload]] = []
    if work.training and not work.checkpointing:
        switches.append(("model.gradient-checkpointing=true", dataclasses.replace(work, checkpointing=True)))
    if work.quantization == "none" and work.weight_bytes == 4:
        switches.append(("model.dtype='bf16'", dataclasses.replace(work, weight_bytes=2, activation_bytes=2)))
    if work.quantization != "nf4":
        switches.append(("model.quantization='nf4'", dataclasses.replace(work, quantization="nf4")))
    if work.dp == "hooks":
        switches.append(("dp.grad-sample-mode='ghost'", dataclasses.replace(work, dp="ghost")))
    found = [name for name, changed in switches if fits(changed)]
    if spread_capacity is not None and spread_capacity > capacity and fits(work, spread_capacity):
        found.append("model.device-map='spread'")
    for key, field in (("batch-size", "batch"), ("dataset.max-length", "length")):
        smaller = [v for v in _halvings(getattr(work, field)) if fits(dataclasses.replace(work, **{field: v}))]
        if smaller:
            found.append(f"{key}={smaller[0]}")
    if found:
        return found
    combined = dataclasses.replace(work, checkpointing=work.training, quantization="nf4", weight_bytes=2,
                                   activation_bytes=2, dp="ghost" if work.dp == "hooks" else work.dp)
    names = [name for name, _ in switches]
    for batch in [combined.batch, *_halvings(combined.batch)]:
        if fits(dataclasses.replace(combined, batch=batch)):
            return [" + ".join(names + ([f"batch-size={batch}"] if batch != work.batch else []))]
    return []


def facts_of(model: torch.nn.Module, adapter: str, causal: bool) -> ModelFacts:
    """The :class:`ModelFacts` of an adapted model (a PeftModel, usually around a meta-device skeleton) whose adapter
    ``adapter`` is the one to train; ``causal``: a causal LM (else a sequence classifier)."""
    from peft.tuners.lora import LoraLayer

    from fedlora.models.precision import NOT_QUANTIZED

    quantizable = dense = trainable = adapter_io = 0
    seen: set[int] = set()  # tied weights (a causal LM's input and output embeddings) count once
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{name}.{pname}"
            if ("lora_" in full or "modules_to_save" in full) and f".{adapter}." in full:
                trainable += param.numel()
            elif "lora_" in full or "modules_to_save" in full:
                continue  # another client's adapter
            elif isinstance(module, torch.nn.Linear) and pname == "weight" and not any(
                    part in NOT_QUANTIZED for part in name.split(".")):
                quantizable += param.numel()
            else:
                dense += param.numel()
        if isinstance(module, LoraLayer) and adapter in module.r:
            adapter_io += module.in_features + module.r[adapter]
    config = model.config
    return ModelFacts(
        quantizable=quantizable, dense=dense, trainable=trainable, adapter_io=adapter_io,
        hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        layers=config.num_hidden_layers, heads=config.num_attention_heads,
        outputs=config.vocab_size if causal else config.num_labels, per_token_outputs=causal,
    )


def refusal(who: str, device: str, est: MemoryEstimate, capacity: float, limited: bool, knobs: list[str]) -> str:
    """The one line that refuses a run whose estimate for ``who`` ('client', 'server') exceeds ``capacity``."""
    where = "memory.limit-gb" if limited else f"{device}'s memory"
    fix = ("it would fit with " + "; or ".join(knobs)) if knobs else \
        "no setting of model.*, batch-size or dataset.max-length fits: use a device with more memory"
    return f"the {who} model does not fit {device}: estimated {est.describe()} > {size(capacity)} ({where}); {fix}"
