"""Plain reference implementations of the aggregation equations, and "one pass" over the inputs.

They are what a straightforward server would write: stack every client's tensor and average
(FedAvg, FFA-LoRA, Fed-SB), or materialise every client's dense product B_k·A_k of a module
before summing (FLoRA's merge into the base weights, LoRA-FAIR). The aggregation suite times the fedlora
functions against these, on the same inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Sequence

import numpy as np
import torch

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState

if TYPE_CHECKING:
    from benchmarks.aggregation import BaseWeights


def one_pass(states: Sequence[AdapterState]) -> float:
    """Read every input element once (sum all arrays): the floor any aggregation must pay."""
    return float(sum(float(v.sum()) for state in states for v in state.values()))


def naive_average(states: Sequence[AdapterState], weights: np.ndarray) -> AdapterState:
    """``{key: Σ_k p_k X_k[key]}`` by stacking the clients' tensors per key (``np.average``)."""
    return {key: np.average(np.stack([s[key] for s in states]), axis=0, weights=weights) for key in states[0]}


def _dense_products(states: Sequence[AdapterState], module: str, coefficients: Sequence[float]) -> list[np.ndarray]:
    return [c * (s[module + LORA_B] @ s[module + LORA_A]) for s, c in zip(states, coefficients)]


def naive_merge(base: "BaseWeights", states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float]) -> None:
    """W0 += Σ_k p_k s_k B_k A_k per module, holding every client's dense product at once."""
    for module in lora_modules(states[0]):
        delta = np.sum(_dense_products(states, module, [p * s for p, s in zip(weights, scales)]), axis=0)
        base.get_submodule(module).base_layer.weight += torch.from_numpy(delta)


def naive_lorafair(states: Sequence[AdapterState], weights: np.ndarray, lam: float) -> AdapterState:
    """Ā and B̄ + (ΔW − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹ per module, with ΔW built from every dense product."""
    out: AdapterState = {}
    for module in lora_modules(states[0]):
        delta_w = np.sum(_dense_products(states, module, weights), axis=0)
        A_bar = np.average(np.stack([s[module + LORA_A] for s in states]), axis=0, weights=weights)
        B_bar = np.average(np.stack([s[module + LORA_B] for s in states]), axis=0, weights=weights)
        gram = A_bar @ A_bar.T + lam * np.eye(A_bar.shape[0])
        correction = np.linalg.solve(gram, ((delta_w - B_bar @ A_bar) @ A_bar.T).T).T
        out[module + LORA_A] = A_bar
        out[module + LORA_B] = B_bar + correction
    return out
