"""Math every strategy shares: client weights p_k, weighted averages, the aggregation error.

Notation: client k has LoRA factors A_k (r×k), B_k (d×r), scale s_k = α/r_k and weight
p_k = n_k / Σ_j n_j (or 1/K when weighting is uniform). The ideal global update of a
module is ``ΔW* = Σ_k p_k s_k B_k A_k``; a strategy applies some ΔW, and its aggregation
error is ``‖ΔW − ΔW*‖_F / ‖ΔW*‖_F`` with both norms summed over all adapted modules.
All math runs in float64 on numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

AdapterState = dict[str, np.ndarray]


def client_weights(num_examples: Sequence[int], mode: str) -> np.ndarray:
    """p_k: proportional to ``num_examples`` (mode 'num-examples') or uniform; sums to 1."""
    n = np.asarray(num_examples, dtype=np.float64)
    if n.size == 0:
        raise ValueError("no client updates to weight")
    if mode == "uniform":
        return np.full(n.size, 1.0 / n.size)
    if mode != "num-examples":
        raise ValueError(f"weighting={mode!r} is not 'num-examples' or 'uniform'")
    if np.any(n <= 0):
        raise ValueError(f"num-examples must be > 0 for every client, got {n.tolist()}")
    return n / n.sum()


def weighted_average(states: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray, keys: Iterable[str]) -> AdapterState:
    """``{key: Σ_k p_k X_k[key]}`` computed in float64, returned as float32."""
    return {key: weighted_sum([state[key] for state in states], weights).astype(np.float32) for key in keys}


def weighted_sum(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Σ_k p_k X_k in float64 (same-shaped arrays)."""
    acc = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for p, x in zip(weights, arrays):
        acc += p * np.asarray(x, dtype=np.float64)
    return acc


def ideal_update(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], scales: Sequence[float], weights: np.ndarray) -> np.ndarray:
    """ΔW* = Σ_k p_k s_k B_k A_k for one module (float64, d×k)."""
    total = None
    for B, A, s, p in zip(Bs, As, scales, weights):
        term = (p * s) * (np.asarray(B, dtype=np.float64) @ np.asarray(A, dtype=np.float64))
        total = term if total is None else total + term
    return total


def relative_error(pairs: Iterable[tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]]) -> float:
    """``sqrt(Σ‖applied − ideal‖²) / sqrt(Σ‖ideal‖²)`` over modules, one dense module at a time.

    ``pairs`` yields ``(applied, ideal)`` thunks, so only one module's d×k products are
    ever materialised. Returns 0.0 when the ideal update is zero everywhere.
    """
    num, den = 0.0, 0.0
    for applied_fn, ideal_fn in pairs:
        ideal = ideal_fn()
        diff = applied_fn() - ideal
        num += float(np.sum(diff * diff))
        den += float(np.sum(ideal * ideal))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def check_same_keys(states: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Every client upload must carry the same tensor names (shapes may differ, e.g. ranks)."""
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            diff = sorted(set(state) ^ keys)
            raise ValueError(f"client upload {i} carries different tensors than upload 0: {diff[:3]}")


def average_uploads(states: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray,
                    frozen_suffixes: tuple[str, ...]) -> AdapterState:
    """``{key: Σ_k p_k X_k[key]}`` over every uploaded tensor; frozen tensors must not be uploaded.

    For strategies whose trained tensors average exactly (FFA-LoRA's B, Fed-SB's R, heads):
    the frozen factors (``frozen_suffixes``) are identical on all clients and never travel up.
    """
    check_same_keys(states)
    frozen = sorted(k for k in states[0] if k.endswith(frozen_suffixes))
    if frozen:
        raise ValueError(f"uploads must not contain frozen tensors, got {frozen[:3]}")
    return weighted_average(states, weights, states[0].keys())


def aggregate_extras(states: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray,
                     factor_suffixes: tuple[str, ...]) -> AdapterState:
    """``{key: Σ_k p_k X_k[key]}`` for the tensors that are not low-rank factors (a head, say).

    Strategies that combine the factors in their own way (FLoRA, LoRA-FAIR) average the
    remaining, fully-trained tensors plainly with this.
    """
    check_same_keys(states)
    return weighted_average(states, weights, [k for k in states[0] if not k.endswith(factor_suffixes)])
