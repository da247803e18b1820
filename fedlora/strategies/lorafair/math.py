"""LoRA-FAIR's ridge correction of B and its residuals, in float64 (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.traffic import Shapes
from fedlora.strategies.common import aggregate_extras, check_same_keys, weighted_sum
from fedlora.strategies.error_norms import ROW_BLOCK, averaging_error2, gram_norm2


def residual_times_A(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray, B_bar: np.ndarray,
                     A_bar: np.ndarray) -> np.ndarray:
    """R Āᵀ for the residual R = ΔW − B̄Ā = Σ_k p_k (B_k − B̄)(A_k − Ā)Āᵀ, never forming R (d×r, float64).

    = [B_1 − B̄ … B_K − B̄] · C with C = [p_1 (A_1 − Ā)Āᵀ; …; p_K (A_K − Ā)Āᵀ] (Kr × r). The
    differences are taken first, in the uploads' precision (the subtraction is where precision
    matters), into one small buffer per factor that is reused block by block over the long
    dimension (:data:`~fedlora.strategies.error_norms.ROW_BLOCK` columns of A, rows of B): C
    accumulates (Kr × cols)·(cols × r) products, then each row block of R Āᵀ is one
    (rows × Kr)·(Kr × r) product. The buffers stay in the CPU cache and no stacked copy of the
    uploads is ever made: O((d + k) r² K) flops, two passes over the uploads.
    """
    dtype = np.result_type(*Bs, *As)
    B_ref, A_ref = np.asarray(B_bar, dtype=dtype), np.asarray(A_bar, dtype=dtype)
    (d, r), k = B_ref.shape, A_ref.shape[1]
    stacked = r * len(As)
    core = np.zeros((stacked, r), dtype=dtype)
    diff_A = np.empty((stacked, min(ROW_BLOCK, k)), dtype=dtype)
    for start in range(0, k, ROW_BLOCK):
        cols = slice(start, min(start + ROW_BLOCK, k))
        block = diff_A[:, : cols.stop - start]
        for i, A in enumerate(As):
            np.subtract(A[:, cols], A_ref[:, cols], out=block[i * r:(i + 1) * r])
        core += block @ A_ref[:, cols].T
    core *= np.repeat(np.asarray(weights, dtype=np.float64), r).astype(dtype)[:, None]
    out = np.empty((d, r), dtype=np.float64)
    diff_B = np.empty((min(ROW_BLOCK, d), stacked), dtype=dtype)
    for start in range(0, d, ROW_BLOCK):
        rows = slice(start, min(start + ROW_BLOCK, d))
        block = diff_B[: rows.stop - start]
        for i, B in enumerate(Bs):
            np.subtract(B[rows], B_ref[rows], out=block[:, i * r:(i + 1) * r])
        out[rows] = block @ core
    return out


def ridge_correction(R_At: np.ndarray, A_bar: np.ndarray, lam: float) -> np.ndarray:
    """ΔB* = R Āᵀ (ĀĀᵀ + λI)⁻¹ from R Āᵀ (:func:`residual_times_A`) and Ā (r×k), in float64.

    It minimises ‖R − ΔB Ā‖²_F + λ‖ΔB‖²_F (least squares, minimum norm, when λ = 0).
    """
    if lam < 0:
        raise ValueError(f"lorafair.lambda must be >= 0, got {lam}")
    A_bar = np.asarray(A_bar, dtype=np.float64)
    gram = A_bar @ A_bar.T + lam * np.eye(A_bar.shape[0])
    R_At = np.asarray(R_At, dtype=np.float64)
    if lam > 0:
        # ĀĀᵀ + λI is symmetric positive definite: its r×r inverse, then one d×r·r×r product (LAPACK's solve with
        # d right-hand sides took 15× longer at d = 4096)
        return R_At @ np.linalg.inv(gram)
    # R Āᵀ (ĀĀᵀ)⁺ = R Ā⁺ is the minimum-norm solution when ĀĀᵀ is singular (λ = 0); the r×r pseudo-inverse
    # comes from its eigendecomposition (cutoff r·ε·λ_max), far cheaper than lstsq over d right-hand sides
    return R_At @ np.linalg.pinv(gram, hermitian=True)


def correct_module(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray, lam: float,
                   measure: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float] | None]:
    """(Ā, B̄ + ΔB*, and when ``measure`` the squared ‖ΔW − B̄Ā‖, ‖ΔW − (B̄ + ΔB*)Ā‖, ‖ΔW‖) for one module, float64.

    ΔB* needs only R Āᵀ (:func:`residual_times_A`), so without ``measure`` the correction costs
    a pass over the uploads. The norms come from the centred Grams of FedIT's error
    (:func:`fedlora.strategies.error_norms.averaging_error2`) and ‖R − ΔB Ā‖² = ‖R‖² −
    2⟨R Āᵀ, ΔB⟩ + ‖ΔB Ā‖². No d×k matrix is ever held.
    """
    A_bar, B_bar = weighted_sum(As, weights), weighted_sum(Bs, weights)
    R_At = residual_times_A(Bs, As, weights, B_bar, A_bar)
    correction = ridge_correction(R_At, A_bar, lam)
    if not measure:
        return A_bar, B_bar + correction, None
    before2, ideal2 = averaging_error2(Bs, As, weights, B_bar, A_bar)
    after2 = max(before2 - 2.0 * float(np.sum(R_At * correction)) + gram_norm2(correction, A_bar), 0.0)
    return A_bar, B_bar + correction, (before2, after2, ideal2)


def lorafair_module(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray,
                    lam: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(Ā, B̄ + ΔB*, ‖ΔW − B̄Ā‖_F, ‖ΔW − (B̄ + ΔB*)Ā‖_F) for one module, all in float64."""
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
