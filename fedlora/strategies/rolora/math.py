"""RoLoRA's alternation, its average of the trained factor and its (zero) aggregation error, in float64."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import averages_with_rounding, check_same_keys
from fedlora.strategies.error_norms import error_ratio, rounding_error2
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


def average_with_error(states: list[AdapterState], weights: np.ndarray, shared: AdapterState, scale: float,
                       server_round: int, measure: bool = True) -> tuple[AdapterState, dict[str, float]]:
    """The round's averages (trained factor, head; float32) and, when ``measure``, ``agg_error``.

    The clients' factors are their trained one and the shared one of ``shared`` (the global
    adapter the round started from): B_k with the global Ā in odd rounds, the global B̄ with
    A_k in even ones. The ideal is then the product with the exact average, and the error is
    the float32 rounding of the stored one against the shared factor's Gram
    (:func:`fedlora.strategies.error_norms.rounding_error2`). Uploads must hold no shared factor.
    """
    check_same_keys(states)
    frozen = shared_factor(server_round)
    if any(k.endswith(frozen) for k in states[0]):
        raise ValueError(f"round {server_round} uploads must not contain the shared factor {frozen!r}")
    trained = trained_factor(server_round)

    def rounding(key: str, exact: np.ndarray, stored: np.ndarray) -> tuple[float, float] | None:
        if not key.endswith(trained):
            return None
        other = np.asarray(shared[key[: -len(trained)] + frozen])  # its r×r Gram in its own precision
        if trained == LORA_B:
            return rounding_error2(exact, stored, other @ other.T, scale)
        return rounding_error2(exact.T, stored.T, other.T @ other, scale)

    stored, errors = averages_with_rounding(states, weights, states[0].keys(), rounding if measure else None)
    return stored, ({"agg_error": error_ratio(errors)} if measure else {})


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Down: the whole adapter (r(d+k) per module, the head). Up: the round's trained factor
    (B, r·d, in odd rounds; A, r·k, in even ones) and the head. Nothing in round 0."""
    if server_round == 0:
        return {}
    return dict(adapter) if direction == "down" else upload_part(adapter, server_round)
