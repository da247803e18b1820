"""FFA-LoRA's average of B and its (zero) aggregation error, in float64."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.state import AdapterState
from fedlora.strategies.traffic import Shapes
from fedlora.strategies.common import average_uploads, check_same_keys, ideal_factors, relative_error, weighted_sum


def trainable_part(state: AdapterState) -> AdapterState:
    """What an FFA-LoRA client uploads: every tensor of ``state`` except the frozen ``lora_A``."""
    return {k: v for k, v in state.items() if not k.endswith(LORA_A)}


def aggregate_ffa(states: list[AdapterState], weights: np.ndarray) -> AdapterState:
    """Σ_k p_k X_k for every uploaded tensor (the B factors and extras); uploads hold no A."""
    return average_uploads(states, weights, (LORA_A,))


def ffa_error(states: list[AdapterState], weights: np.ndarray, frozen_A: AdapterState, scale: float) -> float:
    """‖s·B̄A − Σ_k p_k s·B_k A‖_F / ‖Σ_k p_k s·B_k A‖_F over all modules (zero up to rounding).

    B̄ is taken in float64 here, so the result measures the math, not float32 storage.
    ``frozen_A`` holds ``<module>.lora_A.weight`` for every module whose B was uploaded.
    """
    check_same_keys(states)
    modules = sorted(k[: -len(LORA_B)] for k in states[0] if k.endswith(LORA_B))

    def pairs():
        for m in modules:
            Bs = [s[m + LORA_B] for s in states]
            A = np.asarray(frozen_A[m + LORA_A], dtype=np.float64)
            yield (scale * weighted_sum(Bs, weights), A), ideal_factors(Bs, [A] * len(Bs), [scale] * len(Bs), weights)

    return relative_error(pairs())


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Everything but A, both ways (B: r·d per module, the head); nothing in round 0."""
    return {} if server_round == 0 else {k: v for k, v in adapter.items() if not k.endswith(LORA_A)}
