"""Aggregation strategies by name: pure math plus a thin Flower Strategy each."""

from __future__ import annotations

from fedlora.config import ConfigError, RunConfig
from fedlora.privacy.user_dp import check_user_dp_strategy
from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.common import AdapterState
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.strategies.fedsb import FedSB
from fedlora.strategies.ffa import FFALoRA
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.lorafair import LoraFair

#: strategy name -> server strategy class
STRATEGIES: dict[str, type[LoraStrategy]] = {
    "fedavg": FedAvgLoRA, "ffa": FFALoRA, "flora": FLoRA, "lorafair": LoraFair, "fedsb": FedSB,
}
#: strategies whose aggregation is exact for clients of different LoRA ranks
HETEROGENEOUS_RANKS = {"flora"}


def check_strategy_config(cfg: RunConfig) -> None:
    """Reject unknown strategy names (and, per strategy, incompatible settings)."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(
            f"config key 'strategy' = {cfg.strategy!r} is invalid: expected one of {', '.join(map(repr, STRATEGIES))}"
        )
    if cfg.lora.heterogeneous and cfg.strategy not in HETEROGENEOUS_RANKS:
        raise ConfigError(
            f"config keys 'lora.client-ranks' = {cfg.lora.client_ranks!r} and 'strategy' = {cfg.strategy!r} are incompatible: "
            f"only {', '.join(map(repr, sorted(HETEROGENEOUS_RANKS)))} aggregates clients of different ranks exactly"
        )
    check_privacy_config(cfg)


def check_privacy_config(cfg: RunConfig) -> None:
    """DP settings that cannot work together are refused before anything loads."""
    dp = cfg.dp
    if dp.mode == "none":
        return
    if dp.noise_multiplier <= 0 and dp.target_epsilon <= 0:
        raise ConfigError(
            f"config keys 'dp.noise-multiplier' = {dp.noise_multiplier} and 'dp.target-epsilon' = {dp.target_epsilon} "
            f"are invalid with dp.mode={dp.mode!r}: set a noise multiplier > 0 or a budget ε > 0 to calibrate it from"
        )
    if dp.mode == "user":
        try:
            check_user_dp_strategy(cfg.strategy)
        except ValueError as err:
            raise ConfigError(f"config keys 'dp.mode' and 'strategy': {err}") from err
    if dp.mode == "sample" and cfg.precision == "fp16":
        raise ConfigError("config keys 'dp.mode' = 'sample' and 'precision' = 'fp16' are incompatible: "
                          "loss scaling breaks per-example clipping; use 'bf16' or 'fp32'")


def build_strategy(cfg: RunConfig, initial_state: AdapterState) -> LoraStrategy:
    return STRATEGIES[cfg.strategy](cfg, initial_state)
