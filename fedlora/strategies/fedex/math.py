"""FedEx-LoRA's residual, the form it travels in, and its (zero) aggregation error (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import DENSE_DELTA, LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import Factored, check_same_keys, ideal_factors
from fedlora.strategies.error_norms import error_ratio, stack_norms2, stack_rounding
from fedlora.protocol import merge_record
from fedlora.strategies.traffic import Shapes, in_record, lora_dims


def residual_factors(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray, B_bar: np.ndarray,
                     A_bar: np.ndarray, scale: float = 1.0, dtype: type = np.float64) -> Factored:
    """s·R = s(Σ_k p_k B_k A_k − B̄Ā) as factors [B_1 … B_K, −B̄] · s[p_1A_1; …; p_KA_K; Ā], written in ``dtype``
    (each s·p_k A_k rounded once; B_k and −B̄ as given)."""
    return ideal_factors([*Bs, -np.asarray(B_bar)], [*As, A_bar], [scale] * (len(Bs) + 1), [*weights, 1.0], dtype=dtype)


def factored_is_smaller(d: int, k: int, inner: int) -> bool:
    """Whether factors of inner size ``inner`` (d×m and m×k) hold fewer numbers than the dense d×k matrix."""
    return inner * (d + k) < d * k


def residual_merge(states: Sequence[AdapterState], weights: np.ndarray, average: AdapterState, scale: float,
                   measure: bool = True) -> tuple[AdapterState, AdapterState, dict[str, float]]:
    """(the merge as it travels, the same merge as factors, ``agg_error`` when ``measure``) of s·R per module, float32.

    R is taken against the averages as stored (``average``, float32: what clients load), so the
    merged base plus s·B̄Ā is exact. The travelling form of a module is its factors
    (``lora_B`` = [B_1 … B_K, −B̄], ``lora_A`` = s·[p_1A_1; …; Ā]) or, when that is larger, the
    dense ``base_delta`` s·R. ``agg_error`` = ‖s·B̄Ā + merge − Σ p_k s B_k A_k‖ / ‖Σ p_k s B_k A_k‖
    is the float32 rounding of what travels: U·ΔV for factors, ΔV the rounding of s·[p_kA_k; Ā],
    with the ideal ‖U_K·V_K‖ of the clients' part of the same stack
    (:func:`fedlora.strategies.error_norms.stack_norms2`: one UᵀU Gram), or the dense difference.
    """
    check_same_keys(states)
    merge: AdapterState = {}
    factors: AdapterState = {}
    errors = []
    for m in lora_modules(states[0]):
        Bs, As = [s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states]
        B_bar, A_bar = average[m + LORA_B], average[m + LORA_A]
        U, V = residual_factors(Bs, As, weights, B_bar, A_bar, scale, dtype=np.float32)
        factors[m + LORA_B], factors[m + LORA_A] = U, V
        clients_inner = sum(A.shape[0] for A in As)
        if not factored_is_smaller(U.shape[0], V.shape[1], U.shape[1]):
            exact = np.asarray(U, np.float64) @ residual_factors(Bs, As, weights, B_bar, A_bar, scale)[1]
            merge[m + DENSE_DELTA] = exact.astype(np.float32)
            if measure:
                ideal = exact + scale * (np.asarray(B_bar, np.float64) @ np.asarray(A_bar, np.float64))
                errors.append((float(np.sum((merge[m + DENSE_DELTA] - exact) ** 2)), float(np.sum(ideal**2))))
            continue
        merge[m + LORA_B], merge[m + LORA_A] = U, V
        if measure:
            rounding = stack_rounding(V, [*As, A_bar], [scale * p for p in [*weights, 1.0]])
            errors.append(stack_norms2(U, V, rounding, ideal_inner=clients_inner))
    return merge, factors, ({"agg_error": error_ratio(errors)} if measure else {})


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """The whole adapter both ways; down, from round 2, also the previous round's residual of inner size
    (clients+1)·r per module — factored, or dense d×k where that is smaller. Nothing in round 0."""
    if server_round == 0:
        return {}
    out = dict(adapter)
    if direction == "down" and server_round > 1:
        merge: Shapes = {}
        for m, (d, k, r) in lora_dims(adapter).items():
            inner = (clients + 1) * r
            if factored_is_smaller(d, k, inner):
                merge[m + LORA_B], merge[m + LORA_A] = (d, inner), (inner, k)
            else:
                merge[m + DENSE_DELTA] = (d, k)
        out.update(in_record(merge_record(server_round - 1), merge))
    return out
