"""FLoRA's stacking of client factors and its (zero) aggregation error (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.protocol import merge_record
from fedlora.strategies.traffic import Shapes, at_rank, extras, in_record, lora_dims
from fedlora.strategies.common import check_same_keys, ideal_factors
from fedlora.strategies.error_norms import error_ratio, stack_norms2, stack_rounding


def _module_factors(states: Sequence[AdapterState], module: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [s[module + LORA_B] for s in states], [s[module + LORA_A] for s in states]


def stacked_state(states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float]) -> AdapterState:
    """Per module, ``<module>.lora_B.weight`` = B_stack and ``<module>.lora_A.weight`` = A_stack (float32).

    Rank Σ_k r_k with every client's p_k s_k folded into A_stack: the update is B_stack·A_stack
    at scale 1 (what :func:`fedlora.adapters.lora.merge_into_base` adds). Only the factors;
    average the other tensors with ``aggregate_extras``.
    """
    check_same_keys(states)
    out: AdapterState = {}
    for module in lora_modules(states[0]):
        out[module + LORA_B], out[module + LORA_A] = ideal_factors(*_module_factors(states, module), scales, weights,
                                                                   dtype=np.float32)
    return out


def flora_error(stack: AdapterState, states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float]) -> float:
    """‖B_stack·A_stack − Σ_k p_k s_k B_k A_k‖_F / ‖Σ_k p_k s_k B_k A_k‖_F for the ``stack`` that is merged
    (:func:`stacked_state`, float32), against the float64 ideal: zero up to float32 rounding.

    B_stack is the clients' B_k as uploaded (exact); only A_stack = [p_k s_k A_k] is rounded, so the
    error is B_stack·ΔA with ΔA_k = A_stack,k − p_k s_k A_k (:func:`fedlora.strategies.error_norms.stack_norms2`:
    O((d + k)(Σr_k)²) per module).
    """
    check_same_keys(states)

    def errors():
        for m in lora_modules(states[0]):
            V = stack[m + LORA_A]
            rounding = stack_rounding(V, [state[m + LORA_A] for state in states], [p * s for p, s in zip(weights, scales)])
            yield stack_norms2(stack[m + LORA_B], V, rounding)

    return error_ratio(errors())


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Up: a fresh LoRA (r(d+k) per module) and the head. Down: the head and, from round 2,
    the previous round's merge at stacked rank clients·r."""
    if server_round == 0:
        return {}
    if direction == "up":
        return dict(adapter)
    if server_round == 1:
        return extras(adapter)
    rank = next(iter(lora_dims(adapter).values()))[2]
    stack = {k: v for k, v in at_rank(adapter, clients * rank).items() if k.endswith((LORA_A, LORA_B))}
    return {**extras(adapter), **in_record(merge_record(server_round - 1), stack)}
