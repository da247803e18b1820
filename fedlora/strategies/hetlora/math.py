"""HetLoRA's zero-padding, sparsity weights and weighted average, in float64 (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import (
    Factored, aggregate_extras, check_same_keys, frobenius, ideal_factors, relative_error, weighted_sum,
)
from fedlora.strategies.traffic import Shapes


def zero_pad(B: np.ndarray, A: np.ndarray, rank: int, scale: float, global_scale: float) -> Factored:
    """(B', A') of rank ``rank`` at ``global_scale`` with s_R·B'·A' = s_k·B·A: B' = [(s_k/s_R)·B, 0], A' = [A; 0]."""
    r = A.shape[0]
    if r > rank:
        raise ValueError(f"a rank-{r} client update cannot be padded to the global rank {rank}")
    B_pad = np.zeros((B.shape[0], rank))
    A_pad = np.zeros((rank, A.shape[1]))
    B_pad[:, :r] = (scale / global_scale) * np.asarray(B, dtype=np.float64)
    A_pad[:r] = np.asarray(A, dtype=np.float64)
    return B_pad, A_pad


def sparsity_weights(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], scales: Sequence[float],
                     weights: np.ndarray) -> np.ndarray:
    """w_k ∝ p_k·‖s_k B_k A_k‖_F, normalised to sum 1; ``weights`` (p_k) when every norm is zero."""
    norms = np.array([s * frobenius((np.asarray(B, np.float64), np.asarray(A, np.float64)))
                      for B, A, s in zip(Bs, As, scales)])
    raw = np.asarray(weights, dtype=np.float64) * norms
    return raw / raw.sum() if raw.sum() > 0 else np.asarray(weights, dtype=np.float64)


def aggregate_hetlora(states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float], global_rank: int,
                      global_scale: float) -> tuple[AdapterState, dict[str, float]]:
    """The new global adapter (rank R, scale ``global_scale``; float32), the extras averaged with p_k, and ``agg_error``."""
    check_same_keys(states)
    out = aggregate_extras(states, weights, (LORA_A, LORA_B))
    pairs = []
    for m in lora_modules(states[0]):
        Bs, As = [s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states]
        padded = [zero_pad(B, A, global_rank, s, global_scale) for B, A, s in zip(Bs, As, scales)]
        w = sparsity_weights(Bs, As, scales, weights)
        B_bar, A_bar = weighted_sum([b for b, _ in padded], w), weighted_sum([a for _, a in padded], w)
        out[m + LORA_B], out[m + LORA_A] = B_bar.astype(np.float32), A_bar.astype(np.float32)
        applied = (global_scale * out[m + LORA_B].astype(np.float64), out[m + LORA_A].astype(np.float64))
        pairs.append((applied, ideal_factors(Bs, As, scales, weights)))
    return out, {"agg_error": relative_error(pairs)}


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """The whole adapter at the client's rank both ways (r(d+k) per module, the head); nothing in round 0."""
    return {} if server_round == 0 else dict(adapter)
