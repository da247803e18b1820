"""The run config as every entry point gets it: parsed, and checked against the registries.

:func:`fedlora.config.parse_config` knows types and ranges only. :func:`load_config` also
parses every registered strategy's config section and checks what needs the registries:
the strategy name and what it can do (heterogeneous ranks, user-level DP needs a linear
strategy), DP settings that cannot work together, and the model and dataset names. Every
failure is one :class:`~fedlora.config.ConfigError` naming the key, the value and what is
allowed.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedlora.config import ConfigError, RunConfig, default_flat_config, parse_config
from fedlora.data.sources import check_dataset_name
from fedlora.models.registry import check_model_name
from fedlora.strategies.registry import StrategySpec, option_sections, strategies


def load_config(flat: Mapping[str, Any]) -> RunConfig:
    """Validate Flower's flat run config (see the module docstring) and return it typed."""
    cfg = parse_config(flat, option_sections())
    check_strategy(cfg)
    check_model_name(cfg.model.name)
    check_dataset_name(cfg.dataset.name, cfg.dataset.task)
    return cfg


def full_defaults() -> dict[str, Any]:
    """Every key, core and strategy sections, with its default (what pyproject.toml lists)."""
    return default_flat_config(option_sections())


def check_strategy(cfg: RunConfig) -> StrategySpec:
    """The registered strategy of ``cfg``, after checking that it supports the configured ranks and privacy."""
    known = strategies()
    if cfg.strategy not in known:
        raise ConfigError(
            f"config key 'strategy' = {cfg.strategy!r} is invalid: expected one of {', '.join(map(repr, known))}"
        )
    spec = known[cfg.strategy]
    if cfg.lora.heterogeneous and not spec.capabilities.heterogeneous_ranks:
        capable = sorted(name for name, s in known.items() if s.capabilities.heterogeneous_ranks)
        raise ConfigError(
            f"config keys 'lora.client-ranks' = {cfg.lora.client_ranks!r} and 'strategy' = {cfg.strategy!r} are "
            f"incompatible: only {', '.join(map(repr, capable))} aggregate clients of different ranks"
        )
    if cfg.model.quantization != "none" and spec.capabilities.needs_dense_base:
        raise ConfigError(f"config keys 'strategy' = {cfg.strategy!r} and 'model.quantization' = "
                          f"{cfg.model.quantization!r} are incompatible: {spec.capabilities.needs_dense_base}, which a "
                          "quantized base cannot take; use model.quantization = 'none' (model.dtype = 'bf16' halves "
                          "fp32's memory)")
    check_privacy(cfg, spec)
    if spec.check is not None:
        spec.check(cfg)
    return spec


def check_privacy(cfg: RunConfig, spec: StrategySpec) -> None:
    """DP settings that cannot work together are refused before anything loads."""
    dp = cfg.dp
    if dp.mode == "none":
        return
    if dp.noise_multiplier <= 0 and dp.target_epsilon <= 0:
        raise ConfigError(
            f"config keys 'dp.noise-multiplier' = {dp.noise_multiplier} and 'dp.target-epsilon' = {dp.target_epsilon} "
            f"are invalid with dp.mode={dp.mode!r}: set a noise multiplier > 0 or a budget ε > 0 to calibrate it from"
        )
    if dp.mode == "user" and not spec.capabilities.linear:
        linear = sorted(name for name, s in strategies().items() if s.capabilities.linear)
        raise ConfigError(
            f"config keys 'dp.mode' = 'user' and 'strategy' = {cfg.strategy!r} are incompatible: "
            f"{spec.capabilities.not_linear}, so noise on an average does not bound any single client's influence; "
            f"use one of {', '.join(map(repr, linear))}"
        )
    if dp.mode == "sample" and cfg.precision == "fp16":
        raise ConfigError("config keys 'dp.mode' = 'sample' and 'precision' = 'fp16' are incompatible: "
                          "loss scaling breaks per-example clipping; use 'bf16' or 'fp32'")
