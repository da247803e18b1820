"""RoLoRA's alternation, its average of the trained factor and its (zero) aggregation error, in float64."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import (
    Factored, average_uploads, check_same_keys, ideal_factors, relative_error, weighted_sum,
)
from fedlora.strategies.traffic import Shapes

T = TypeVar("T")


def trained_factor(server_round: int) -> str:
    """The suffix of the factor clients train in ``server_round``: B in odd rounds, A in even ones."""
    return LORA_B if server_round % 2 == 1 else LORA_A


def shared_factor(server_round: int) -> str:
    """The suffix of the factor that stays the global one in ``server_round`` (the other one)."""
    return LORA_A if trained_factor(server_round) == LORA_B else LORA_B


def upload_part(state: Mapping[str, T], server_round: int) -> dict[str, T]:
    """What a client uploads in ``server_round``: every tensor of ``state`` but the shared factor."""
    frozen = shared_factor(server_round)
    return {k: v for k, v in state.items() if not k.endswith(frozen)}


def aggregate_rolora(states: list[AdapterState], weights: np.ndarray, server_round: int) -> AdapterState:
    """Σ_k p_k X_k for every uploaded tensor (the round's trained factor, the head); uploads hold no shared factor."""
    return average_uploads(states, weights, (shared_factor(server_round),))


def rolora_error(states: list[AdapterState], weights: np.ndarray, shared: AdapterState, scale: float,
                 server_round: int) -> float:
    """‖s·B̄Ā − Σ_k p_k s·B_k A_k‖_F / ‖Σ_k p_k s·B_k A_k‖_F over all modules (zero up to rounding).

    The clients' factors are their trained one and the shared one of ``shared`` (the global
    adapter the round started from): B_k with the global Ā in odd rounds, the global B̄
    with A_k in even ones. The average is taken in float64, so the result measures the math.
    """
    check_same_keys(states)
    trains_b = trained_factor(server_round) == LORA_B
    K = len(states)

    def pairs() -> Iterator[tuple[Factored, Factored]]:
        for m in lora_modules(shared):
            if trains_b:
                Bs, As = [s[m + LORA_B] for s in states], [np.asarray(shared[m + LORA_A], dtype=np.float64)] * K
                applied = (scale * weighted_sum(Bs, weights), As[0])
            else:
                Bs, As = [np.asarray(shared[m + LORA_B], dtype=np.float64)] * K, [s[m + LORA_A] for s in states]
                applied = (scale * Bs[0], weighted_sum(As, weights))
            yield applied, ideal_factors(Bs, As, [scale] * K, weights)

    return relative_error(pairs())


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Down: the whole adapter (r(d+k) per module, the head). Up: the round's trained factor
    (B, r·d, in odd rounds; A, r·k, in even ones) and the head. Nothing in round 0."""
    if server_round == 0:
        return {}
    return dict(adapter) if direction == "down" else upload_part(adapter, server_round)
