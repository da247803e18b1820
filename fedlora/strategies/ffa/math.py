"""FFA-LoRA's average of B and its (zero) aggregation error, in float64."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.state import AdapterState
from fedlora.strategies.traffic import Shapes
from fedlora.strategies.common import averages_with_rounding, check_same_keys
from fedlora.strategies.error_norms import error_ratio, rounding_error2


def trainable_part(state: AdapterState) -> AdapterState:
    """What an FFA-LoRA client uploads: every tensor of ``state`` except the frozen ``lora_A``."""
    return {k: v for k, v in state.items() if not k.endswith(LORA_A)}


def average_with_error(states: list[AdapterState], weights: np.ndarray, frozen_A: AdapterState, scale: float,
                       measure: bool = True) -> tuple[AdapterState, dict[str, float]]:
    """B̄ (+ head), float32, and, when ``measure``, ``agg_error`` = ‖s·B̄₃₂A − Σ_k p_k s·B_k A‖ / ‖Σ_k p_k s·B_k A‖.

    By linearity the ideal is s·B̄A with the exact B̄, so the error is the float32 rounding of the
    stored B̄ against the Gram AAᵀ of the frozen A (:func:`fedlora.strategies.error_norms.rounding_error2`:
    O((d + k) r²) per module). ``frozen_A`` holds ``<module>.lora_A.weight`` for every module whose
    B was uploaded; uploads must hold no A.
    """
    check_same_keys(states)
    if any(k.endswith(LORA_A) for k in states[0]):
        raise ValueError("FFA-LoRA uploads must not contain the frozen A")

    def rounding(key: str, exact: np.ndarray, stored: np.ndarray) -> tuple[float, float] | None:
        if not key.endswith(LORA_B):
            return None
        A = np.asarray(frozen_A[key[: -len(LORA_B)] + LORA_A])
        return rounding_error2(exact, stored, A @ A.T, scale)  # the r×r Gram in A's precision

    stored, errors = averages_with_rounding(states, weights, states[0].keys(), rounding if measure else None)
    return stored, ({"agg_error": error_ratio(errors)} if measure else {})


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Everything but A, both ways (B: r·d per module, the head); nothing in round 0."""
    return {} if server_round == 0 else {k: v for k, v in adapter.items() if not k.endswith(LORA_A)}
