"""How a frozen base is held: its dtype, its quantization (bitsandbytes) and where its layers live.

A :class:`BaseSpec` is resolved once per node from the run config and the node's device
(:func:`base_spec`) and is part of every cache key of a resident base, so a process never
mixes bases held differently. Quantization is the QLoRA recipe: 4-bit NF4 with double
quantization (``nf4``) or LLM.int8 (``int8``) for every ``nn.Linear`` of the base except the
output head; the compute dtype is the base dtype. Adapters are never quantized and stay
float32 whatever the base (:func:`fedlora.adapters.lora.inject_lora`).

Whether the installed bitsandbytes can run a quantization on a device is asked of
bitsandbytes itself, once per process: :func:`check_quantization` quantizes a small layer on
the device and runs a forward and a backward pass through it (bitsandbytes 0.50 runs both
kinds on CPU as well as on CUDA); a failure is a :class:`~fedlora.config.ConfigError` at
start that says what would work instead.

bitsandbytes 0.50 repacks a 4-bit weight into a CPU inference layout the first time a layer
runs in eval mode without gradients on a CPU with AVX512-BF16; after that no gradient reaches
the adapters on that layer (training silently stops), and the repacking fails outright for
layers narrower than a quantization block. A fedlora base evaluates and trains in turn, so
:func:`keep_training_layout` turns that repacking off.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import BitsAndBytesConfig

from fedlora.config import ConfigError, ModelConfig
from fedlora.device import base_dtype, visible_gpus

#: modules bitsandbytes leaves in the base dtype: the output heads (transformers' own default is the same idea)
NOT_QUANTIZED = ["lm_head", "score", "classifier"]


@dataclass(frozen=True)
class BaseSpec:
    """A base's dtype, quantization and placement: the node's ``device``, or every visible GPU (``spread``)."""

    dtype: torch.dtype = torch.float32
    quantization: str = "none"
    device: str = "cpu"
    spread: bool = False

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


def base_spec(model: ModelConfig, device: torch.device) -> BaseSpec:
    """The spec of ``model.*`` on ``device`` (``auto`` dtype resolved); refuses what this machine cannot run."""
    if model.device_map == "spread" and device.type != "cuda":
        raise ConfigError(f"config key 'model.device-map' = 'spread' needs CUDA devices; this node's device is "
                          f"{device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" is the current GPU: name it
    if model.quantization != "none":
        check_quantization(model.quantization, str(device))
    return BaseSpec(base_dtype(model.dtype, device), model.quantization, str(device), model.device_map == "spread")


def quantization_config(spec: BaseSpec) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for ``spec`` (None for an unquantized base)."""
    if not spec.quantized:
        return None
    if spec.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=spec.dtype, llm_int8_skip_modules=NOT_QUANTIZED)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)


def keep_training_layout(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` in the layout its backward pass needs (see the module docstring)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def device_map(spec: BaseSpec) -> dict[str, str] | str:
    """``from_pretrained``'s device_map: everything on the node's device, or balanced over the visible GPUs."""
    return "balanced" if spec.spread else {"": spec.device}


def max_memory(spec: BaseSpec) -> dict[int, int] | None:
    """With ``spread``: each visible GPU's total memory, so nothing is offloaded to the CPU."""
    if not spec.spread:
        return None
    return {gpu.index: torch.cuda.get_device_properties(gpu).total_memory for gpu in visible_gpus()}


@functools.cache
def check_quantization(kind: str, device: str) -> None:
    """Raise :class:`ConfigError` unless the installed bitsandbytes quantizes, runs and backpropagates a layer as
    ``kind`` on ``device`` (see the module docstring)."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(f"config key 'model.quantization' = {kind!r} needs bitsandbytes, which is not installed "
                          f"({err}); `pip install 'bitsandbytes>=0.50.2'` (make setup does) or use 'none'") from err
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if kind == "nf4":
                layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                          compress_statistics=True)
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer = layer.to(device)
            x = torch.randn(2, 64, device=device, requires_grad=True)
            layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("the backward pass gave no finite input gradient")
    except Exception as err:  # noqa: BLE001 — whatever bitsandbytes raises, the answer is the same line
        elsewhere = "a bitsandbytes build for this GPU" if device.startswith("cuda") else "a CUDA device"
        raise ConfigError(
            f"config key 'model.quantization' = {kind!r} cannot run on {device} with bitsandbytes {bnb.__version__} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use model.quantization = 'none' "
            f"with model.dtype = 'bf16' (half of fp32's memory), or {elsewhere}"
        ) from err
