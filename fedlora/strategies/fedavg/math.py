"""FedIT's average and its aggregation error, in float64 (see the package docstring for the equations)."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import weighted_average, weighted_sum
from fedlora.strategies.error_norms import averaging_error2, error_ratio
from fedlora.strategies.traffic import Shapes


def fedavg_states(states: list[AdapterState], weights: np.ndarray) -> AdapterState:
    """Σ_k p_k X_k for every tensor of the adapter."""
    return weighted_average(states, weights, states[0].keys())


def average_with_error(states: list[AdapterState], weights: np.ndarray, scale: float,
                       measure: bool = True) -> tuple[AdapterState, dict[str, float]]:
    """FedIT's global adapter (Σ_k p_k X_k, float32) and, when ``measure``, its ``agg_error``.

    ``agg_error`` = ‖s·B̄Ā − Σ p_k s B_kA_k‖ / ‖Σ p_k s B_kA_k‖ over all LoRA modules, for the
    float64 averages (:func:`fedlora.strategies.error_norms.averaging_error2`: the centred
    cross term Σp_k (B_k − B̄)(A_k − Ā)); the float32 rounding of the stored averages, orders
    of magnitude smaller, is not part of it. Module by module: one module's float64 averages
    exist at a time.
    """
    modules = lora_modules(states[0])
    factors = {m + suffix for m in modules for suffix in (LORA_A, LORA_B)}
    out = weighted_average(states, weights, [k for k in states[0] if k not in factors])
    errors = []
    for m in modules:
        Bs, As = [s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states]
        B_bar, A_bar = weighted_sum(Bs, weights), weighted_sum(As, weights)
        out[m + LORA_B], out[m + LORA_A] = B_bar.astype(np.float32), A_bar.astype(np.float32)
        if measure:
            errors.append(averaging_error2(Bs, As, weights, B_bar, A_bar, scale))
    ordered = {k: out[k] for k in states[0]}
    return ordered, ({"agg_error": error_ratio(errors)} if measure else {})


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """The whole adapter both ways (A, B: r(d+k) per module, the head); nothing in round 0."""
    return {} if server_round == 0 else dict(adapter)
