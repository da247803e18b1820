"""LoRA-FAIR's ridge correction of B and its residuals (equations: the package docstring): the r×r algebra and the
norms in float64, the two products over the uploads in the uploads' precision."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.traffic import Shapes
from fedlora.strategies.common import aggregate_extras, check_same_keys, stack_product, weighted_sum
from fedlora.strategies import error_norms
from fedlora.strategies.error_norms import averaging_error2


def centred_cross(As: Sequence[np.ndarray], A_bar: np.ndarray) -> np.ndarray:
    """[(A_1 − Ā)Āᵀ; …; (A_K − Ā)Āᵀ] (Kr × r) in the uploads' precision, one pass over the A_k.

    The differences are taken first (the subtraction is where precision matters) into a reused buffer
    of as many clients' r×k blocks as fit in :data:`~fedlora.strategies.error_norms.BLOCK_BYTES` (the Grams'
    block size: a few MiB, in the CPU's last-level cache), and each such stack is
    contracted with Āᵀ by one GEMM, so Ā is packed once per stack instead of once per client. Measured
    at K = 10, r = 16, k = 4096 (float32, one thread): 0.4 ms per module, against 0.5 ms for one GEMM per
    client and 0.75 ms for blocks of the whole stack's columns.
    """
    dtype = np.result_type(*As)
    A_ref = np.asarray(A_bar, dtype=dtype)
    r, k = A_ref.shape
    out = np.empty((r * len(As), r), dtype=dtype)
    per_stack = max(1, error_norms.BLOCK_BYTES // max(r * k * dtype.itemsize, 1))
    buffer = np.empty((r * min(per_stack, len(As)), k), dtype=dtype)
    for first in range(0, len(As), per_stack):
        group = As[first:first + per_stack]
        stack = buffer[: r * len(group)]
        for i, A in enumerate(group):
            np.subtract(A, A_ref, out=stack[i * r:(i + 1) * r])
        np.dot(stack, A_ref.T, out=out[first * r:(first + len(group)) * r])
    return out


def ridge_inverse(A_bar: np.ndarray, lam: float) -> np.ndarray:
    """(ĀĀᵀ + λI)⁻¹ (r×r, float64); for λ = 0 the pseudo-inverse (ĀĀᵀ)⁺, from its eigendecomposition
    (cutoff r·ε·λ_max), which gives the minimum-norm least-squares correction when ĀĀᵀ is singular."""
    if lam < 0:
        raise ValueError(f"lorafair.lambda must be >= 0, got {lam}")
    A_bar = np.asarray(A_bar, dtype=np.float64)
    gram = A_bar @ A_bar.T + lam * np.eye(A_bar.shape[0])
    return np.linalg.inv(gram) if lam > 0 else np.linalg.pinv(gram, hermitian=True)


def correction_matrices(cross: np.ndarray, weights: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """C = [C_1; …; C_K] (Kr × r, float64) with C_k = p_k M_k G⁻¹, M_k = (A_k − Ā)Āᵀ (``cross``): ΔB* = Σ_k B_k C_k."""
    r = inverse.shape[0]
    blocks = np.asarray(cross, dtype=np.float64).reshape(len(weights), r, r) @ inverse
    return (np.asarray(weights, dtype=np.float64)[:, None, None] * blocks).reshape(len(weights) * r, r)


def mixing_matrices(corrections: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """W = [W_1; …; W_K] with W_k = p_k I + C_k (``corrections``, :func:`correction_matrices`): B̄ + ΔB* = Σ_k B_k W_k."""
    r = corrections.shape[1]
    mixing = corrections.copy().reshape(len(weights), r, r)
    mixing[:, np.arange(r), np.arange(r)] += np.asarray(weights, dtype=np.float64)[:, None]
    return mixing.reshape(len(weights) * r, r)


def correct_module(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray, lam: float,
                   measure: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float] | None]:
    """(Ā, B̄ + ΔB*, and when ``measure`` the squared ‖ΔW − B̄Ā‖, ‖ΔW − (B̄ + ΔB*)Ā‖, ‖ΔW‖) for one module: Ā and the
    norms in float64, B̄ + ΔB* in the uploads' precision (float64 uploads: all float64).

    With the residual R = ΔW − B̄Ā = Σ_k p_k (B_k − B̄)(A_k − Ā) and G = ĀĀᵀ + λI,
    ΔB* = R Āᵀ G⁻¹ = Σ_k p_k (B_k − B̄) M_k G⁻¹ with M_k = (A_k − Ā)Āᵀ; because Σ_k p_k M_k = 0
    the B̄ term vanishes and the corrected factor is one mixing product over the uploads,

        B̄ + ΔB* = Σ_k B_k · (p_k I + p_k M_k G⁻¹)        (:func:`mixing_matrices`, :func:`~fedlora.strategies.common.stack_product`),

    so the correction costs one pass over the A_k (after Ā) and one over the B_k, which also
    replaces B̄'s own pass. Both are thin matrix products (2r²(d + k)K flops) that run in the uploads'
    precision — float32 from real clients, twice float64's speed, as exact as the float32 B that is stored —
    and B̄ + ΔB* is computed the same way whether or not the norms are asked for. The norms (``measure``)
    come from the centred Grams of FedIT's error (:func:`fedlora.strategies.error_norms.averaging_error2`)
    and, as R Āᵀ = ΔB* G, ‖R − ΔB* Ā‖² = ‖R‖² − tr(ΔB* (ĀĀᵀ + 2λI) ΔB*ᵀ), with ΔB* = Σ_k B_k C_k as its own
    product (precise relative to ΔB*, not to B). No d×k matrix is ever held.
    """
    A_bar = weighted_sum(As, weights)
    corrections = correction_matrices(centred_cross(As, A_bar), weights, ridge_inverse(A_bar, lam))
    precision = np.result_type(*Bs)
    B_new = stack_product(Bs, mixing_matrices(corrections, weights), "left", precision)
    if not measure:
        return A_bar, B_new, None
    correction = stack_product(Bs, corrections, "left", precision).astype(np.float64)
    before2, ideal2 = averaging_error2(Bs, As, weights, weighted_sum(Bs, weights), A_bar)
    reduction = float(np.sum((correction.T @ correction) * (A_bar @ A_bar.T + 2.0 * lam * np.eye(A_bar.shape[0]))))
    return A_bar, B_new, (before2, max(before2 - reduction, 0.0), ideal2)


def lorafair_module(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray,
                    lam: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(Ā, B̄ + ΔB*, ‖ΔW − B̄Ā‖_F, ‖ΔW − (B̄ + ΔB*)Ā‖_F) for one module (:func:`correct_module`)."""
    A_bar, B_new, (before2, after2, _) = correct_module(Bs, As, weights, lam)
    return A_bar, B_new, float(np.sqrt(before2)), float(np.sqrt(after2))


def aggregate_lorafair(states: Sequence[AdapterState], weights: np.ndarray, lam: float,
                       measure: bool = True) -> tuple[AdapterState, dict[str, float]]:
    """The next global adapter (Ā, B̄ + ΔB*, averaged extras; float32) and, when ``measure``, its metrics.

    Metrics, each summed in quadrature over modules and divided by ‖ΔW‖_F (also summed in
    quadrature; no division when ΔW = 0): ``residual_before`` = ‖ΔW − B̄Ā‖ (FedIT's error),
    ``residual_after`` = ‖ΔW − (B̄ + ΔB*)Ā‖, and ``agg_error``, which equals
    ``residual_after`` because the shared scale s cancels in the relative error.
    """
    check_same_keys(states)
    out = aggregate_extras(states, weights, (LORA_A, LORA_B))
    before, after, ideal = 0.0, 0.0, 0.0
    for m in lora_modules(states[0]):
        Bs, As = [s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states]
        A_bar, B_new, norms = correct_module(Bs, As, weights, lam, measure)
        out[m + LORA_A] = A_bar.astype(np.float32)
        out[m + LORA_B] = B_new.astype(np.float32)
        if norms is not None:
            before, after, ideal = before + norms[0], after + norms[1], ideal + norms[2]
    if not measure:
        return out, {}
    norm = np.sqrt(ideal) if ideal > 0 else 1.0
    rel_after = float(np.sqrt(after) / norm)
    return out, {"residual_before": float(np.sqrt(before) / norm), "residual_after": rel_after, "agg_error": rel_after}


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """As FedIT: the whole adapter both ways (r(d+k) per module, the head); nothing in round 0."""
    return {} if server_round == 0 else dict(adapter)
