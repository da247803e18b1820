"""FlexLoRA's SVD of the averaged update, its truncations and their errors, in float64 (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.common import aggregate_extras, check_same_keys, svd_of_stack
from fedlora.strategies.traffic import Shapes


def orthonormal_rows(Qt: np.ndarray, rank: int) -> np.ndarray:
    """``Qt`` (m×k, orthonormal rows) completed to ``rank`` orthonormal rows when m < rank.

    The added rows span directions orthogonal to Qt's (a fixed-seed Gaussian block projected off
    Qt's rows twice, then a thin QR: O(k·rank²)), so factors with zero singular values there still
    train (their B columns start at zero, A rows do not).
    """
    m, k = Qt.shape
    if m >= rank:
        return Qt[:rank]
    if rank > k:
        raise ValueError(f"rank {rank} exceeds the module's input size {k}")
    extra = np.random.default_rng(0).standard_normal((rank - m, k))
    for _ in range(2):
        extra -= (extra @ Qt.T) @ Qt
    return np.concatenate([Qt, np.linalg.qr(extra.T)[0].T], axis=0)


def truncated(P: np.ndarray, sigma: np.ndarray, Qt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) at scale 1 with B·A = T_rank(P Σ Qᵀ): B = P_r Σ_r (zero columns past the singular vectors given),
    A = Q_rᵀ completed to ``rank`` orthonormal rows."""
    m = min(rank, P.shape[1])
    B = np.zeros((P.shape[0], rank))
    B[:, :m] = P[:, :m] * sigma[:m]
    return B, orthonormal_rows(Qt, rank)


def tail_energy(sigma: np.ndarray, rank: int) -> float:
    """‖X − T_rank(X)‖²_F = Σ_{i>rank} σ_i²."""
    return float(np.sum(sigma[rank:] ** 2))


def aggregate_flexlora(states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float], ranks: Sequence[int],
                       global_rank: int, global_scale: float, measure: bool = True) -> tuple[AdapterState, dict[str, float]]:
    """The new global adapter — T_R(ΔW̄) as a LoRA of rank R and scale ``global_scale``, averaged extras — and its errors.

    ``ranks`` are the clients' r_k (for ``client_truncation_error``). The global B is
    P_R Σ_R / s_R, A = Q_Rᵀ (float32), so s_R·B·A = T_R(ΔW̄) and A's rows are orthonormal.
    """
    check_same_keys(states)
    out = aggregate_extras(states, weights, (LORA_A, LORA_B))
    total = global_tail = client_tail = 0.0
    for m in lora_modules(states[0]):
        P, sigma, Qt = svd_of_stack([s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states],
                                    [float(p * s) for p, s in zip(weights, scales)], global_rank)
        B, A = truncated(P, sigma, Qt, global_rank)
        out[m + LORA_B] = (B / global_scale).astype(np.float32)
        out[m + LORA_A] = A.astype(np.float32)
        total += float(np.sum(sigma ** 2))
        global_tail += tail_energy(sigma, global_rank)
        client_tail += sum(p * tail_energy(sigma, r) for p, r in zip(weights, ranks))
    if not measure:
        return out, {}
    norm = np.sqrt(total) if total > 0 else 1.0
    return out, {"agg_error": float(np.sqrt(global_tail) / norm), "client_truncation_error": float(np.sqrt(client_tail) / norm)}


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """The whole adapter at the client's rank both ways (r(d+k) per module, the head); nothing in round 0."""
    return {} if server_round == 0 else dict(adapter)
