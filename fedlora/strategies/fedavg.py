"""FedAvg over LoRA factors (FedIT): average A and B separately.

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k,   applied ΔW = s·B̄Ā

This is inexact: ``Σ_k p_k B_k A_k − B̄Ā = Σ_k p_k (B_k − B̄)(A_k − Ā)``, which vanishes
only when the clients' A (or B) agree. Other trained tensors (a classification head)
are averaged plainly.
"""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.strategies.base import ClientUpdate, LoraStrategy
from fedlora.strategies.common import AdapterState, ideal_factors, relative_error, weighted_average


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


class FedAvgLoRA(LoraStrategy):
    """FedIT: clients train A and B; the server averages each."""

    name = "fedavg"

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = [u.state for u in updates]
        scale = self.cfg.lora.alpha / self.cfg.lora.rank
        return fedavg_states(states, weights), {"agg_error": fedavg_error(states, weights, scale)}
