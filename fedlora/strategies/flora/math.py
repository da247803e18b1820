"""FLoRA's round merge as a weighted stack of the clients' own factors (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.stack import COEFFICIENTS, term_name, weighted_stack
from fedlora.adapters.state import AdapterState
from fedlora.protocol import merge_record
from fedlora.strategies.common import check_same_keys
from fedlora.strategies.traffic import Shapes, extras, in_record, lora_dims


def stacked_state(states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float]) -> AdapterState:
    """The round's merge Σ_k p_k s_k B_k A_k per module, as a weighted stack (:mod:`fedlora.adapters.stack`).

    The factors are the clients' uploads as they are (the read-only views of their replies: no
    copy, forwarded as the same bytes) and the coefficients c_k = p_k s_k are float64, so what
    every node merges is the ideal update exactly — FLoRA's ``agg_error`` is 0 by construction.
    Only the factors; average the other tensors with ``aggregate_extras``.
    """
    check_same_keys(states)
    factors = {m: [(state[m + LORA_B], state[m + LORA_A]) for state in states] for m in lora_modules(states[0])}
    return weighted_stack(factors, [float(p * s) for p, s in zip(weights, scales)])


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Up: a fresh LoRA (r(d+k) per module) and the head. Down: the head and, from round 2, the previous
    round's merge — every client's factors (clients·r(d+k) per module) and one float64 coefficient each."""
    if server_round == 0:
        return {}
    if direction == "up":
        return dict(adapter)
    if server_round == 1:
        return extras(adapter)
    stack: Shapes = {}
    for m, (d, k, r) in lora_dims(adapter).items():
        for i in range(clients):
            stack[term_name(m, LORA_B, i)], stack[term_name(m, LORA_A, i)] = (d, r), (r, k)
    stack[COEFFICIENTS] = (clients,)
    return {**extras(adapter), **in_record(merge_record(server_round - 1), stack)}
