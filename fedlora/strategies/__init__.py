"""Aggregation strategies by name: pure math plus a thin Flower Strategy each."""

from __future__ import annotations

from fedlora.config import ConfigError, RunConfig
from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.common import AdapterState
from fedlora.strategies.fedavg import FedAvgLoRA

#: strategy name -> server strategy class
STRATEGIES: dict[str, type[LoraStrategy]] = {"fedavg": FedAvgLoRA}


def check_strategy_config(cfg: RunConfig) -> None:
    """Reject unknown strategy names (and, per strategy, incompatible settings)."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(
            f"config key 'strategy' = {cfg.strategy!r} is invalid: expected one of {', '.join(map(repr, STRATEGIES))}"
        )


def build_strategy(cfg: RunConfig, initial_state: AdapterState) -> LoraStrategy:
    return STRATEGIES[cfg.strategy](cfg, initial_state)
