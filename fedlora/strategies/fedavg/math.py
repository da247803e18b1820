"""FedIT's average and its aggregation error, in float64 (see the package docstring for the equations)."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.traffic import Shapes
from fedlora.strategies.common import ideal_factors, relative_error, weighted_average


def fedavg_states(states: list[AdapterState], weights: np.ndarray) -> AdapterState:
    """Σ_k p_k X_k for every tensor of the adapter."""
    return weighted_average(states, weights, states[0].keys())


def fedavg_error(states: list[AdapterState], weights: np.ndarray, scale: float) -> float:
    """‖s·B̄Ā − Σ p_k s B_kA_k‖_F / ‖Σ p_k s B_kA_k‖_F over all LoRA modules (B̄, Ā as stored, float32)."""
    avg = fedavg_states(states, weights)

    def pairs():
        for m in lora_modules(states[0]):
            applied = (scale * avg[m + LORA_B].astype(np.float64), avg[m + LORA_A].astype(np.float64))
            ideal = ideal_factors([s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states],
                                  [scale] * len(states), weights)
            yield applied, ideal

    return relative_error(pairs())


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """The whole adapter both ways (A, B: r(d+k) per module, the head); nothing in round 0."""
    return {} if server_round == 0 else dict(adapter)
