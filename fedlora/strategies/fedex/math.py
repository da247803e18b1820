"""FedEx-LoRA's residual, the form it travels in, and its aggregation error (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import DENSE_DELTA, LORA_A, LORA_B, lora_modules
from fedlora.adapters.stack import COEFFICIENTS, folded, term_name, weighted_stack
from fedlora.adapters.state import AdapterState
from fedlora.protocol import merge_record
from fedlora.strategies.common import check_same_keys
from fedlora.strategies.error_norms import error_ratio, gram_norm2
from fedlora.strategies.traffic import Shapes, in_record, lora_dims


def residual_terms(states: Sequence[AdapterState], average: AdapterState, module: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The factors of s·R for ``module``: every client's (B_k, A_k) as uploaded, then the stored averages (B̄, Ā)."""
    return [*((s[module + LORA_B], s[module + LORA_A]) for s in states), (average[module + LORA_B], average[module + LORA_A])]


def residual_coefficients(weights: np.ndarray, scale: float) -> list[float]:
    """c = (s·p_1, …, s·p_K, −s): s·R = Σ_k c_k B_k A_k + c_{K+1} B̄Ā."""
    return [float(scale * p) for p in weights] + [-float(scale)]


def factored_is_smaller(d: int, k: int, inner: int) -> bool:
    """Whether factors of inner size ``inner`` (d×m and m×k) hold fewer numbers than the dense d×k matrix."""
    return inner * (d + k) < d * k


def residual_merge(states: Sequence[AdapterState], weights: np.ndarray, average: AdapterState, scale: float,
                   measure: bool = True) -> tuple[AdapterState, AdapterState, dict[str, float]]:
    """(the merge as it travels, the same merge as a weighted stack, ``agg_error`` when ``measure``) of s·R.

    R is taken against the averages as stored (``average``, float32: what clients load), so the
    merged base plus s·B̄Ā is exact. A module's residual travels as the weighted stack of the
    clients' factors and (B̄, Ā) with float64 coefficients (:func:`residual_coefficients`;
    :mod:`fedlora.adapters.stack`) — exact, no copy — or, when (K+1)r(d+k) ≥ d·k, as the dense
    ``base_delta`` s·R computed in float64 and rounded once. ``agg_error`` =
    ‖s·B̄Ā + merge − Σ p_k s B_k A_k‖ / ‖Σ p_k s B_k A_k‖ is therefore 0 unless some module travels
    dense; then it is that rounding, over the ideal norms of every module (Grams of the clients' stack).
    """
    check_same_keys(states)
    modules = lora_modules(states[0])
    coefficients = residual_coefficients(weights, scale)
    terms = {m: residual_terms(states, average, m) for m in modules}
    factors = weighted_stack(terms, coefficients)
    dense = [m for m in modules if not factored_is_smaller(average[m + LORA_B].shape[0], average[m + LORA_A].shape[1],
                                                          sum(A.shape[0] for _, A in terms[m]))]
    if not dense:
        return factors, factors, ({"agg_error": 0.0} if measure else {})
    stacked = [m for m in modules if m not in dense]
    merge: AdapterState = weighted_stack({m: terms[m] for m in stacked}, coefficients) if stacked else {}
    errors = []
    for m in dense:
        Bs, As = zip(*terms[m])
        exact = np.matmul(*folded(Bs, As, coefficients))
        merge[m + DENSE_DELTA] = exact.astype(np.float32)
        if measure:
            ideal = exact + scale * (np.asarray(Bs[-1], np.float64) @ np.asarray(As[-1], np.float64))
            errors.append((float(np.sum((merge[m + DENSE_DELTA] - exact) ** 2)), float(np.sum(ideal**2))))
    if measure:
        for m in stacked:
            Bs, As = zip(*terms[m][:-1])
            errors.append((0.0, gram_norm2(*folded(Bs, As, coefficients[:-1], np.result_type(*Bs, *As)))))
    return merge, factors, ({"agg_error": error_ratio(errors)} if measure else {})


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """The whole adapter both ways; down, from round 2, also the previous round's residual per module: the
    (clients+1) factor pairs of r(d+k) and one float64 coefficient each — or dense d×k where that is smaller.
    Nothing in round 0."""
    if server_round == 0:
        return {}
    out = dict(adapter)
    if direction == "down" and server_round > 1:
        merge: Shapes = {}
        for m, (d, k, r) in lora_dims(adapter).items():
            if factored_is_smaller(d, k, (clients + 1) * r):
                for i in range(clients + 1):
                    merge[term_name(m, LORA_B, i)], merge[term_name(m, LORA_A, i)] = (d, r), (r, k)
                merge[COEFFICIENTS] = (clients + 1,)
            else:
                merge[m + DENSE_DELTA] = (d, k)
        out.update(in_record(merge_record(server_round - 1), merge))
    return out
