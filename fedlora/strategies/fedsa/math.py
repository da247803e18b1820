"""FedSA-LoRA's averages, what travels down, and the global model's aggregation error, in float64."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import Factored, check_same_keys, ideal_factors, relative_error, weighted_average
from fedlora.strategies.traffic import Shapes

T = TypeVar("T")


def shared_part(state: Mapping[str, T]) -> dict[str, T]:
    """What the clients receive: every tensor of ``state`` but the B factors (Ā and the head)."""
    return {k: v for k, v in state.items() if not k.endswith(LORA_B)}


def own_part(state: Mapping[str, T]) -> dict[str, T]:
    """What a client keeps for itself: the B factors of ``state``."""
    return {k: v for k, v in state.items() if k.endswith(LORA_B)}


def aggregate_fedsa(states: list[AdapterState], weights: np.ndarray) -> AdapterState:
    """The global model (Ā, B̄, head): Σ_k p_k X_k for every uploaded tensor.

    Ā and the head are what the clients receive; B̄ = Σ_k p_k B_k serves only the server's
    evaluation and the final adapter.
    """
    check_same_keys(states)
    return weighted_average(states, weights, states[0].keys())


def fedsa_error(states: list[AdapterState], weights: np.ndarray, scale: float) -> float:
    """‖s·B̄Ā − Σ_k p_k s·B_k A_k‖_F / ‖Σ_k p_k s·B_k A_k‖_F over all modules, for the global model.

    B̄ and Ā as stored (float32). Nonzero once the clients' factors differ: the error is
    that of Σ_k p_k (B_k − B̄)(A_k − Ā), as for FedIT.
    """
    average = aggregate_fedsa(states, weights)

    def pairs() -> Iterator[tuple[Factored, Factored]]:
        for m in lora_modules(states[0]):
            applied = (scale * average[m + LORA_B].astype(np.float64), average[m + LORA_A].astype(np.float64))
            yield applied, ideal_factors([s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states],
                                         [scale] * len(states), weights)

    return relative_error(pairs())


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Up: the whole adapter (A, B: r(d+k) per module, the head; B only for the global model).
    Down: everything but B (A: r·k per module, the head). Nothing in round 0."""
    if server_round == 0:
        return {}
    return dict(adapter) if direction == "up" else shared_part(adapter)
