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
    out: AdapterState = {}
    for key in keys:
        acc = np.zeros(np.shape(states[0][key]), dtype=np.float64)
        for p, state in zip(weights, states):
            acc += p * np.asarray(state[key], dtype=np.float64)
        out[key] = acc.astype(np.float32)
    return out


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
