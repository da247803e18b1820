"""Exact Frobenius norms of factored d×k matrices, for every strategy's ``agg_error``.

A strategy's aggregation error is ``‖ΔW − ΔW*‖_F / ‖ΔW*‖_F`` summed over modules
(:func:`error_ratio`), where ΔW is what it applies and ΔW* = Σ_k p_k s_k B_k A_k the ideal.
Both are low-rank, so every norm here comes from small Gram products of the factors,

    ‖U·V‖²_F = Σ_ij (UᵀU)_ij (VVᵀ)_ij,     ⟨Ua·Va, Ub·Vb⟩_F = Σ_ij (Uaᵀ Ub)_ij (Va Vbᵀ)_ij,

never from a d×k matrix and never by QR. Each error is written so that the (small)
difference enters as factors of its own — the centred client factors, the float32 rounding
of what is stored — rather than as the difference of two large, nearly equal norms.

Grams run in the inputs' precision (float32 for the server's uploads: what BLAS is fastest
at, with the syrk kernel for UᵀU) and are summed in float64; the fp64 tests pass float64
inputs and get fp64 results. Cost per module: O((d + k)·m²) for inner size m — quadratic in
K·r for an error that mixes all clients, which is what ``metrics.agg-error-every`` is for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from numpy.typing import DTypeLike

#: at most this many rows (of the long dimension d or k) per block of :func:`stack_blocks`
ROW_BLOCK = 8192
#: bytes of one block of :func:`stack_blocks`: a few MiB, in the CPU's last-level cache, so the stack itself is never
#: held, and as few blocks as that allows, each block's Gram being one BLAS call (measured at K = 10, r = 16,
#: d = k = 4096: the whole 4096 rows in one block ~7 % faster than blocks of 2048) ...
BLOCK_BYTES = 4 << 20
#: ... but never fewer rows than this: every block's Gram is an m×m matrix to add up, so thin blocks of a wide stack
#: (K = 50, r = 64: m = 3136) would spend more on that than on the product (measured: 334-row blocks 1.5× slower;
#: both measurements in benchmarks/results/2026-12-03-server-round-probes.txt)
MIN_ROWS = 2048


def stack_blocks(factors: Sequence[np.ndarray], side: str, dtype: DTypeLike,
                 reference: np.ndarray | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """The stack [F_1 − X … F_K − X] (``side = "left"``: F_k n×r_k, the stack n × Σr_k) or [F_1 − X; …]
    (``"right"``: F_k r_k×n, the stack Σr_k × n), X = ``reference`` (no subtraction when None), one block of
    at most :data:`ROW_BLOCK` rows (columns) and :data:`BLOCK_BYTES` (yet at least :data:`MIN_ROWS` rows) at a
    time: yields (the block's slice of n, the block in ``dtype``).

    Every block lives in the same reused buffer, overwritten by the next: use it before asking for the next.
    """
    left = side == "left"
    dtype = np.dtype(dtype)
    edges = np.concatenate([[0], np.cumsum([F.shape[1 if left else 0] for F in factors])])
    n = factors[0].shape[0 if left else 1]
    step = max(1, min(ROW_BLOCK, n, max(MIN_ROWS, BLOCK_BYTES // max(int(edges[-1]) * dtype.itemsize, 1))))
    buffer = np.empty((step, edges[-1]) if left else (edges[-1], step), dtype=dtype)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        block = buffer[: rows.stop - start] if left else buffer[:, : rows.stop - start]
        for F, lo, hi in zip(factors, edges[:-1], edges[1:]):
            part, target = (F[rows], block[:, lo:hi]) if left else (F[:, rows], block[lo:hi])
            if reference is None:
                target[...] = part
            else:
                np.subtract(part, reference[rows] if left else reference[:, rows], out=target)
        yield rows, block


def factor_gram(factor: np.ndarray, side: str) -> np.ndarray:
    """FᵀF of a left factor F (n×m, ``side = "left"``) or FFᵀ of a right one (m×n), m×m in F's precision
    (numpy's matmul of an array with its own transpose runs BLAS syrk)."""
    return factor.T @ factor if side == "left" else factor @ factor.T


def grams_norm2(GU: np.ndarray, GV: np.ndarray) -> float:
    """‖U·V‖²_F = Σ_ij (UᵀU)_ij (VVᵀ)_ij from the two Grams GU = UᵀU, GV = VVᵀ, summed in float64; ≥ 0."""
    return max(float(np.sum(GU * GV, dtype=np.float64)), 0.0)


def gram_norm2(U: np.ndarray, V: np.ndarray) -> float:
    """‖U·V‖²_F (:func:`grams_norm2` of :func:`factor_gram`'s UᵀU and VVᵀ); ≥ 0 by construction."""
    return grams_norm2(factor_gram(U, "left"), factor_gram(V, "right"))


def difference_grams(factors: Sequence[np.ndarray], reference: np.ndarray | None, coefficients: Sequence[float],
                     probe: np.ndarray | None, side: str, dtype: DTypeLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The Grams of a stack of scaled differences, block by block, in float64.

    ``side = "left"``: the factors F_k are n×r_k and the stack is U = [c_1 (F_1 − X) … c_K (F_K − X)]
    (n × Σr_k, X = ``reference``, or no subtraction when it is None); returns (UᵀU, Pᵀ U) for
    ``probe`` P (n × q; None: no second Gram). ``side = "right"``: the F_k are r_k×n, the stack is
    V = [c_1 (F_1 − X); …] (Σr_k × n); returns (V Vᵀ, P Vᵀ) for P (q × n). The ranks may differ.
    The stack exists one block at a time (:func:`stack_blocks`), in the inputs' precision (or ``dtype``),
    unscaled: the c_k scale the small Grams afterwards ((c_i c_j)·G_ij), not the stack.
    """
    dtype = dtype or np.result_type(*factors, *([] if reference is None else [reference]))
    left = side == "left"
    sizes = [F.shape[1 if left else 0] for F in factors]
    m = sum(sizes)
    gram = np.zeros((m, m))
    cross = None if probe is None else np.zeros((probe.shape[1 if left else 0], m))
    probe = None if probe is None else np.asarray(probe, dtype=dtype)
    for rows, block in stack_blocks(factors, side, dtype, reference):
        gram += factor_gram(block, side)
        if probe is not None:
            cross += probe[rows].T @ block if left else probe[:, rows] @ block.T
    scale = np.repeat(np.asarray(coefficients, dtype=np.float64), sizes)
    return gram * np.outer(scale, scale), None if cross is None else cross * scale


def averaging_error2(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray, B_bar: np.ndarray,
                     A_bar: np.ndarray, scale: float = 1.0) -> tuple[float, float]:
    """(‖s·B̄Ā − Σ p_k s B_k A_k‖², ‖Σ p_k s B_k A_k‖²) of one module, for the float64 averages B̄, Ā (Σ p_k = 1).

    The error is s²‖D‖² with D = Σ_k p_k (B_k − B̄)(A_k − Ā). Because Σ_k p_k (B_k − B̄) = 0,
    D = Σ_k p_k (B_k − B̄)(A_k − Y) for any Y; Y = A_K drops the last client's term, so D has
    inner size (K − 1)r and its norm costs O((d + k)((K − 1)r)²) (:func:`difference_grams`).
    The ideal follows without another quadratic term: ‖ΔW*‖² = s²(‖B̄Ā‖² + ‖D‖² + 2⟨B̄Ā, D⟩).
    With float32 factors, B̄ rounded to float32 (ε·‖B̄‖) perturbs D by at most ε‖B̄‖·‖Ā − A_K‖:
    a relative change of the ratio below 10⁻⁷ of the clients' spread; ‖B̄Ā‖² comes from the same
    rounded averages, in float32 Grams (a relative change of the ideal's norm of order 10⁻⁷).
    """
    dtype = np.result_type(*Bs, *As)
    B_ref, A_ref = np.asarray(B_bar, dtype=dtype), np.asarray(A_bar, dtype=dtype)
    base = gram_norm2(B_ref, A_ref)
    if len(Bs) == 1:
        return 0.0, scale**2 * base
    GB, CB = difference_grams(Bs[:-1], B_ref, [1.0] * (len(Bs) - 1), B_ref, "left")
    GA, CA = difference_grams(As[:-1], np.asarray(As[-1]), weights[:-1], A_ref, "right")
    error = max(float(np.sum(GB * GA)), 0.0)
    cross = float(np.sum(CB * CA))
    return scale**2 * error, scale**2 * max(base + error + 2.0 * cross, 0.0)


def rounding_error2(exact: np.ndarray, stored: np.ndarray, right_gram: np.ndarray, scale: float = 1.0,
                    left_gram: np.ndarray | None = None) -> tuple[float, float]:
    """(‖s·L(X₃₂ − X)F‖², ‖s·L X F‖²) for a product whose middle factor X is stored in float32 and whose
    outer factors are fixed, given their Grams G_F = F Fᵀ and G_L = LᵀL (L = I when ``left_gram`` is None):

        ‖L ΔX F‖² = Σ (ΔXᵀ G_L ΔX) ∘ G_F,   ΔX = X₃₂ − X in float64.

    The rounding enters directly (no cancellation), at O(d r²) beyond the Grams. For FFA-LoRA
    X = B̄ and F = A; for a product F·X (X on the right) pass Xᵀ, X₃₂ᵀ and G_F = FᵀF; for Fed-SB
    X = R̄ between the fixed B (G_L = BᵀB) and A.
    """
    X = np.asarray(exact, dtype=np.float64)
    dX = np.asarray(stored, dtype=np.float64) - X
    G = np.asarray(right_gram, dtype=np.float64)
    if left_gram is None:
        return scale**2 * max(float(np.sum((dX.T @ dX) * G)), 0.0), scale**2 * max(float(np.sum((X.T @ X) * G)), 0.0)
    GL = np.asarray(left_gram, dtype=np.float64)
    error = float(np.sum((dX.T @ GL @ dX) * G))
    ideal = float(np.sum((X.T @ GL @ X) * G))
    return scale**2 * max(error, 0.0), scale**2 * max(ideal, 0.0)


def stack_rounding(V_stored: np.ndarray, factors: Sequence[np.ndarray], coefficients: Sequence[float]) -> np.ndarray:
    """ΔV = V₃₂ − [c_1 F_1; c_2 F_2; …] for a stacked right factor stored as V₃₂ (each block c_k F_k rounded
    once): each block's difference formed in float64, stored in V₃₂'s dtype (the rounding is representable)."""
    rounding = np.empty_like(V_stored)
    start = 0
    for F, c in zip(factors, coefficients):
        rows = slice(start, start + np.shape(F)[0])
        np.subtract(V_stored[rows], float(c) * np.asarray(F, dtype=np.float64), out=rounding[rows], casting="same_kind")
        start = rows.stop
    return rounding


def stack_norms2(U: np.ndarray, V_stored: np.ndarray, V_rounding: np.ndarray,
                 ideal_inner: int | None = None) -> tuple[float, float]:
    """(‖U·ΔV‖², ‖U[:, :n]·V_stored[:n]‖²) sharing one Gram UᵀU: a stack whose left factor U is stored
    exactly (the clients' own factors side by side) and whose right factor is stored with the
    rounding ΔV = V₃₂ − V (:func:`stack_rounding`); n = ``ideal_inner`` (default: all of it) is the
    part of the stack that makes up the ideal update (FedEx-LoRA's residual stack ends with −B̄·Ā).

    The second norm is of the stored factors: it differs from the ideal's by at most ‖U·ΔV‖, so
    the ratio of the two is the relative error up to a factor 1 ± (that ratio). O((d + k)·m²) for
    inner size m; the Grams run in U's precision, summed in float64.
    """
    n = U.shape[1] if ideal_inner is None else ideal_inner
    G = U.T @ U
    dV = np.asarray(V_rounding, dtype=U.dtype)
    error = float(np.sum(G * (dV @ dV.T), dtype=np.float64))
    ideal = float(np.sum(G[:n, :n] * (V_stored[:n] @ V_stored[:n].T), dtype=np.float64))
    return max(error, 0.0), max(ideal, 0.0)


def split_norms2(GU: np.ndarray, GV: np.ndarray, split: int) -> tuple[float, float]:
    """(‖U·V‖², ‖U[:, split:]·V[split:]‖²) from the Grams GU = UᵀU, GV = VVᵀ (the second is their trailing block)."""
    whole = float(np.sum(GU * GV, dtype=np.float64))
    tail = float(np.sum(GU[split:, split:] * GV[split:, split:], dtype=np.float64))
    return max(whole, 0.0), max(tail, 0.0)


def error_ratio(modules: Iterable[tuple[float, float]]) -> float:
    """``sqrt(Σ error²) / sqrt(Σ ideal²)`` over modules from per-module ``(‖applied − ideal‖², ‖ideal‖²)``.

    ``modules`` may be a generator, so only one module's factors exist at a time. Returns 0.0
    when the ideal update is zero.
    """
    num, den = 0.0, 0.0
    for error2, ideal2 in modules:
        num += error2
        den += ideal2
    return float(np.sqrt(num / den)) if den > 0 else 0.0
