"""HetLoRA's zero-padding, sparsity weights and weighted average, in float64 (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import Factored, aggregate_extras, check_same_keys, weighted_sum
from fedlora.strategies.error_norms import difference_grams, error_ratio, factor_gram, grams_norm2, split_norms2
from fedlora.strategies.traffic import Shapes


def padded_average(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], w: np.ndarray, scales: Sequence[float],
                   rank: int, global_scale: float) -> Factored:
    """(Σ_k w_k B'_k, Σ_k w_k A'_k) for the zero-padded factors B'_k = [(s_k/s_R)·B_k, 0], A'_k = [A_k; 0] of rank R
    (s_R·B'_k A'_k = s_k B_k A_k), in float64, without padding: columns (rows) r_{j−1}..r_j collect only the
    clients of rank ≥ r_j, each block summed by :func:`weighted_sum` (when every client has rank R, the whole
    factors at once, with no padded copy)."""
    for A in As:
        if A.shape[0] > rank:
            raise ValueError(f"a rank-{A.shape[0]} client update cannot be padded to the global rank {rank}")
    edges = sorted({0, *(A.shape[0] for A in As)})
    if edges == [0, rank]:  # every client at the global rank: nothing to pad, the sums are the averages
        return (weighted_sum(Bs, np.asarray(w) * np.asarray(scales) / global_scale), weighted_sum(As, w))
    B_bar, A_bar = np.zeros((Bs[0].shape[0], rank)), np.zeros((rank, As[0].shape[1]))
    for lo, hi in zip(edges, edges[1:]):
        ks = [k for k, A in enumerate(As) if A.shape[0] >= hi]
        B_bar[:, lo:hi] = weighted_sum([Bs[k][:, lo:hi] for k in ks], np.array([w[k] * scales[k] / global_scale for k in ks]))
        A_bar[lo:hi] = weighted_sum([As[k][lo:hi] for k in ks], np.array([w[k] for k in ks]))
    return B_bar, A_bar


#: a client's pair of factor Grams (B_kᵀB_k, A_kA_kᵀ), either one None where not made yet
GramPair = tuple[np.ndarray | None, np.ndarray | None]


def sparsity_weights(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], scales: Sequence[float],
                     weights: np.ndarray, grams: Sequence[GramPair] | None = None) -> np.ndarray:
    """w_k ∝ p_k·‖s_k B_k A_k‖_F, normalised to sum 1; ``weights`` (p_k) when every norm is zero.

    ‖B_k A_k‖²_F = Σ_ij (B_kᵀB_k)_ij (A_kA_kᵀ)_ij; ``grams`` gives those Grams where they were made
    already (during validation, :meth:`HetLoRAServer.observe_upload`), the others are made here.
    """
    pairs = grams or [(None, None)] * len(Bs)
    norms = np.array([s * np.sqrt(grams_norm2(factor_gram(B, "left") if GB is None else GB,
                                              factor_gram(A, "right") if GA is None else GA))
                      for B, A, s, (GB, GA) in zip(Bs, As, scales, pairs)])
    raw = np.asarray(weights, dtype=np.float64) * norms
    return raw / raw.sum() if raw.sum() > 0 else np.asarray(weights, dtype=np.float64)


def aggregate_hetlora(states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float], global_rank: int,
                      global_scale: float, measure: bool = True,
                      observed: Sequence[Mapping[str, np.ndarray]] | None = None) -> tuple[AdapterState, dict[str, float]]:
    """The new global adapter (rank R, scale ``global_scale``; float32), the extras averaged with p_k, and, when
    ``measure``, ``agg_error``: ‖s_R B̄Ā − ΔW*‖ and ‖ΔW*‖ from one pair of Grams of the stacked difference
    [B̄, B_1 …]·[s_R Ā; −p_1 s_1 A_1; …] (:func:`fedlora.strategies.error_norms.split_norms2`), built block
    by block without the stack (:func:`~fedlora.strategies.error_norms.difference_grams`), in the uploads'
    precision (HetLoRA's error is large next to float32 rounding). ``observed``: per client, the factor Grams
    already made, by tensor name (:attr:`fedlora.server.round.ClientUpdate.observed`)."""
    check_same_keys(states)
    out = aggregate_extras(states, weights, (LORA_A, LORA_B))
    errors = []
    for m in lora_modules(states[0]):
        Bs, As = [s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states]
        grams = None if observed is None else [(o.get(m + LORA_B), o.get(m + LORA_A)) for o in observed]
        w = sparsity_weights(Bs, As, scales, weights, grams)
        B_bar, A_bar = padded_average(Bs, As, w, scales, global_rank, global_scale)
        out[m + LORA_B], out[m + LORA_A] = B_bar.astype(np.float32), A_bar.astype(np.float32)
        if measure:
            coefficients = [global_scale, *(-np.asarray(weights) * np.asarray(scales))]
            GU, _ = difference_grams([out[m + LORA_B], *Bs], None, [1.0] * (len(Bs) + 1), None, "left")
            GV, _ = difference_grams([out[m + LORA_A], *As], None, coefficients, None, "right")
            errors.append(split_norms2(GU, GV, global_rank))
    ordered = {k: out[k] for k in states[0]}
    return ordered, ({"agg_error": error_ratio(errors)} if measure else {})


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """The whole adapter at the client's rank both ways (r(d+k) per module, the head); nothing in round 0."""
    return {} if server_round == 0 else dict(adapter)
