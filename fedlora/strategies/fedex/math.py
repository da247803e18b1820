"""FedEx-LoRA's residual, the form it travels in, and its (zero) aggregation error (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import DENSE_DELTA, LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import Factored, check_same_keys, ideal_factors, relative_error
from fedlora.protocol import merge_record
from fedlora.strategies.traffic import Shapes, in_record, lora_dims


def residual_factors(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray,
                     B_bar: np.ndarray, A_bar: np.ndarray) -> Factored:
    """R = Σ_k p_k B_k A_k − B̄Ā as factors [B_1 … B_K, −B̄] · [p_1A_1; …; p_KA_K; Ā] (float64)."""
    U, V = ideal_factors(Bs, As, [1.0] * len(Bs), weights)
    return (np.concatenate([U, -np.asarray(B_bar, dtype=np.float64)], axis=1),
            np.concatenate([V, np.asarray(A_bar, dtype=np.float64)], axis=0))


def factored_is_smaller(d: int, k: int, inner: int) -> bool:
    """Whether factors of inner size ``inner`` (d×m and m×k) hold fewer numbers than the dense d×k matrix."""
    return inner * (d + k) < d * k


def residual_merge(states: Sequence[AdapterState], weights: np.ndarray, average: AdapterState,
                   scale: float) -> tuple[AdapterState, AdapterState]:
    """(the merge as it travels, the same merge as factors) of s·R for every module, float32.

    R is taken against the averages as stored (``average``, float32: what clients load), so the
    merged base plus s·B̄Ā is exact. The travelling form of a module is its factors
    (``lora_B`` = [B_1 … B_K, −B̄], ``lora_A`` = s·[p_1A_1; …; Ā]) or, when that is larger, the
    dense ``base_delta`` s·R.
    """
    check_same_keys(states)
    merge: AdapterState = {}
    factors: AdapterState = {}
    for m in lora_modules(states[0]):
        U, V = residual_factors([s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states], weights,
                                average[m + LORA_B], average[m + LORA_A])
        factors[m + LORA_B], factors[m + LORA_A] = U.astype(np.float32), (scale * V).astype(np.float32)
        if factored_is_smaller(U.shape[0], V.shape[1], U.shape[1]):
            merge[m + LORA_B], merge[m + LORA_A] = factors[m + LORA_B], factors[m + LORA_A]
        else:
            merge[m + DENSE_DELTA] = (scale * (U @ V)).astype(np.float32)
    return merge, factors


def fedex_error(states: Sequence[AdapterState], weights: np.ndarray, average: AdapterState, merge: AdapterState,
                scale: float) -> float:
    """‖s·B̄Ā + merge − Σ_k p_k s B_k A_k‖_F / ‖Σ_k p_k s B_k A_k‖_F over modules, for the float32 values applied."""
    def pairs():
        for m in lora_modules(states[0]):
            B_bar = np.asarray(average[m + LORA_B], dtype=np.float64)
            A_bar = np.asarray(average[m + LORA_A], dtype=np.float64)
            if m + DENSE_DELTA in merge:
                dense = np.asarray(merge[m + DENSE_DELTA], dtype=np.float64)
                applied = (np.concatenate([scale * B_bar, dense], axis=1),
                           np.concatenate([A_bar, np.eye(dense.shape[1])], axis=0))
            else:
                applied = (np.concatenate([scale * B_bar, np.asarray(merge[m + LORA_B], dtype=np.float64)], axis=1),
                           np.concatenate([A_bar, np.asarray(merge[m + LORA_A], dtype=np.float64)], axis=0))
            ideal = ideal_factors([s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states],
                                  [scale] * len(states), weights)
            yield applied, ideal

    return relative_error(pairs())


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
