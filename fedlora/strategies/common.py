"""Math every strategy shares: client weights p_k, weighted averages, stacked factors.

Notation: client k has LoRA factors A_k (r×k), B_k (d×r), scale s_k = α/r_k and weight
p_k = n_k / Σ_j n_j (or 1/K when weighting is uniform). The ideal global update of a
module is ``ΔW* = Σ_k p_k s_k B_k A_k``. Averages are summed in float64 and stored as
float32; the norms behind every ``agg_error`` live in :mod:`fedlora.strategies.error_norms`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import DTypeLike
from scipy.linalg import lapack
from scipy.linalg.blas import get_blas_funcs

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.error_norms import difference_grams


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


def averages_with_rounding(states: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray, keys: Iterable[str],
                           rounding: Callable[[str, np.ndarray, np.ndarray], tuple[float, float] | None] | None,
                           ) -> tuple[AdapterState, list[tuple[float, float]]]:
    """(:func:`weighted_average` of ``keys``, and ``rounding(key, exact, stored)`` for each key where it is not None).

    For the strategies whose average is exact (FFA-LoRA, RoLoRA, Fed-SB): their only error is
    the float32 rounding of what they store, and ``rounding`` measures it from the float64
    average while it exists — one key at a time, so no float64 copy of the adapter is held.
    """
    out: AdapterState = {}
    errors: list[tuple[float, float]] = []
    for key in keys:
        exact = weighted_sum([state[key] for state in states], weights)
        out[key] = exact.astype(np.float32)
        measured = rounding(key, exact, out[key]) if rounding is not None else None
        if measured is not None:
            errors.append(measured)
    return out, errors


#: bytes of :func:`weighted_sum`'s float64 buffer of all K clients' values of a block, in the CPU's cache: a block is
#: the largest power of two of elements that fits, but never fewer than :data:`MIN_SUM_BLOCK`. Fewer, longer blocks
#: spend less on per-call overhead (K = 10 at Llama shapes, cold data: 16 Ki-element blocks 4.0 ms a round,
#: 32 Ki 3.2 ms, 64 Ki 2.9 ms), power-of-two blocks keep BLAS's summation that of one whole-array product,
#: and the buffer is transient memory on top of the round's outputs: 8 MiB (64 Ki at K = 10) took FFA-LoRA's and
#: RoLoRA's round peaks to 1.8× Flower's (benchmarks/results/2026-12-03-server-round-probes.txt)
SUM_BUFFER_BYTES = 4 << 20
#: ... never fewer elements per block than this (below it the per-call overhead dominates; at K = 50 the buffer is then
#: 6.4 MiB)
MIN_SUM_BLOCK = 1 << 14


def sum_block(clients: int) -> int:
    """Elements per block of :func:`weighted_sum` for ``clients`` arrays: the largest power of two whose float64
    buffer of all clients fits :data:`SUM_BUFFER_BYTES`, at least :data:`MIN_SUM_BLOCK`."""
    fitting = SUM_BUFFER_BYTES // (8 * max(clients, 1))
    return max(MIN_SUM_BLOCK, 1 << max(fitting.bit_length() - 1, 0))


def weighted_sum(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Σ_k p_k X_k in float64 (same-shaped arrays).

    Block by block over the flattened arrays (:func:`sum_block`): the K clients' values of a block
    are copied into one float64 (K × block) buffer and contracted with p by a matrix-vector product,
    so the inputs are read once and no whole-tensor float64 temporary is ever made.
    """
    weights = np.asarray(weights, dtype=np.float64)
    flats = [np.asarray(x).reshape(-1) for x in arrays]
    size = flats[0].size
    step = sum_block(len(flats))
    out = np.empty(size, dtype=np.float64)
    buffer = np.empty((len(flats), min(step, size)), dtype=np.float64)
    for start in range(0, size, step):
        stop = min(start + step, size)
        block = buffer[:, : stop - start]
        for row, x in zip(block, flats):
            row[:] = x[start:stop]
        np.dot(weights, block, out=out[start:stop])
    return out.reshape(np.shape(arrays[0]))


#: a d×k matrix kept as its factors (U, V), the matrix being U @ V (U: d×m, V: m×k, m small)
Factored = tuple[np.ndarray, np.ndarray]


def concat_factors(updates: Sequence[AdapterState]) -> AdapterState:
    """The sum of factored updates, per LoRA module: ``[B_1 B_2 …]·[A_1; A_2; …] = Σ_j B_j A_j``, one copy each.

    A module only some updates have is concatenated over those (in one of them only: kept as
    it is; an empty state is the empty update). Tensors that are not LoRA factors are taken
    from the last update that has them.
    """
    factors = (LORA_A, LORA_B)
    out: AdapterState = {}
    for update in updates:
        out.update({k: v for k, v in update.items() if not k.endswith(factors)})
    for m in sorted({m for update in updates for m in lora_modules(update)}):
        having = [u for u in updates if m + LORA_A in u]
        if len(having) == 1:
            out[m + LORA_B], out[m + LORA_A] = having[0][m + LORA_B], having[0][m + LORA_A]
            continue
        out[m + LORA_B] = np.concatenate([u[m + LORA_B] for u in having], axis=1)
        out[m + LORA_A] = np.concatenate([u[m + LORA_A] for u in having], axis=0)
    return out


def stack_product(factors: Sequence[np.ndarray], W: np.ndarray, side: str,
                  dtype: DTypeLike = np.float64) -> np.ndarray:
    """Σ_k F_k W_k (``side = "left"``: F_k n×r_k, W = [W_1; …; W_K] of Σr_k rows; n × q) or Σ_k W_k F_k
    (``"right"``: F_k r_k×n, W = [W_1 … W_K] of Σr_k columns; q × n), computed and returned in ``dtype``.

    One BLAS GEMM per factor accumulates into the result in place (β = 1): the uploads are read where
    they lie, with neither the stack nor a per-client product ever held (a factor in another precision
    than ``dtype`` is converted, one at a time). BLAS is column-major, so the C-ordered result is built
    as its transpose: (Σ_k F_k W_k)ᵀ = Σ_k W_kᵀ F_kᵀ. In float32 the product runs at twice float64's
    speed and is as exact as the float32 it is stored in up to the Σr_k-term sums (relative error ≲ Σr_k·ε₃₂).
    """
    left = side == "left"
    dtype = np.dtype(dtype)
    W = np.asarray(W, dtype=dtype)
    gemm = get_blas_funcs("gemm", dtype=dtype)
    n = factors[0].shape[0 if left else 1]
    edges = np.cumsum([0] + [F.shape[1 if left else 0] for F in factors])
    result_t = np.zeros((W.shape[1], n) if left else (n, W.shape[0]), dtype=dtype, order="F")
    for F, lo, hi in zip(factors, edges[:-1], edges[1:]):
        F_t = np.asarray(F, dtype=dtype).T
        if left:
            result_t = gemm(1.0, W[lo:hi].T, F_t, beta=1.0, c=result_t, overwrite_c=True)
        else:
            result_t = gemm(1.0, F_t, W[:, lo:hi].T, beta=1.0, c=result_t, overwrite_c=True)
    return result_t.T


#: the Gram's Cholesky factor is used for the basis when its reciprocal condition number (LAPACK's estimate) is at
#: least this times the eigenvalue cut-off's √(m·ε): the factor keeps every direction the eigen-route would keep
CHOLESKY_MARGIN = 10.0


def gram_basis(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, R) from the Gram FᵀF (m×m, float64) of a factor F: F·T is an orthonormal basis of F's column space and
    F = (F·T)·R.

    When F has full numerical rank — the Cholesky factor of FᵀF = L Lᵀ exists and its condition estimate is
    within :data:`CHOLESKY_MARGIN` of the cut-off below — T = L⁻ᵀ and R = Lᵀ (O(m³/3) flops). Otherwise from
    the eigendecomposition FᵀF = W Λ Wᵀ over the eigenvalues above m·ε·λ_max (the numerical rank's directions
    only): T = W Λ^{-1/2}, R = Λ^{1/2} Wᵀ (an eigensolver, about twenty times the time at m = 160). Both come
    from the same Gram, so F·T is orthonormal to the same order, ε·κ(F)².
    """
    m = gram.shape[0]
    cutoff = np.sqrt(m * np.finfo(np.float64).eps)
    try:
        L = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        L = None
    if L is not None and lapack.dtrcon(L, norm="1", uplo="L")[0] >= CHOLESKY_MARGIN * cutoff:
        inverse, info = lapack.dtrtri(L, lower=1)
        if info == 0:
            return inverse.T, L.T
    eigenvalues, W = np.linalg.eigh(gram)
    kept = eigenvalues > m * np.finfo(np.float64).eps * max(float(eigenvalues[-1]), 0.0)
    W, root = W[:, kept], np.sqrt(eigenvalues[kept])
    return W / root, root[:, None] * W.T


def svd_of_stack(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coefficients: Sequence[float],
                 rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SVD (P, σ, Qᵀ) of the d×k matrix Σ_k c_k B_k A_k = U·V, U = [B_1 … B_K], V = [c_1 A_1; …] (any
    mix of ranks, inner size m = Σr_k small), from the m×m Grams of its factors, in float64.

    The Grams UᵀU and VVᵀ give bases (:func:`gram_basis`) Q_u = U T_u with U = Q_u R_u, and
    Q_v = Vᵀ T_v with V = R_vᵀ Q_vᵀ, so U·V = Q_u C Q_vᵀ with the small core C = R_u R_vᵀ; its SVD
    C = X Σ Yᵀ gives P = Q_u X and Qᵀ = Yᵀ Q_vᵀ. Neither U·V, the stacks U, V nor Q_u, Q_v is
    formed: the Grams are summed block by block
    (:func:`~fedlora.strategies.error_norms.difference_grams`) and only the first ``rank`` columns of
    P (rows of Qᵀ) are, as U·(T_u X) and (Yᵀ T_vᵀ)·V (:func:`stack_product`) — (d + k)·m² flops for
    the Grams and 2(d + k)·m·rank for the products. σ has min(d, k, m) entries, descending (zeros past
    the product's numerical rank); P and Qᵀ have min(``rank`` (default: all), the numerical rank)
    singular vectors.
    """
    GU, _ = difference_grams(Bs, None, [1.0] * len(Bs), None, "left", dtype=np.float64)
    GV, _ = difference_grams(As, None, coefficients, None, "right", dtype=np.float64)
    Tu, Ru = gram_basis(GU)
    Tv, Rv = gram_basis(GV)
    X, core_sigma, Yt = np.linalg.svd(Ru @ Rv.T, full_matrices=False)
    n = len(core_sigma) if rank is None else min(rank, len(core_sigma))
    sigma = np.zeros(min(np.shape(Bs[0])[0], np.shape(As[0])[1], GU.shape[0]))
    sigma[: len(core_sigma)] = core_sigma[: len(sigma)]
    P = stack_product(Bs, Tu @ X[:, :n], "left")
    column_scale = np.repeat(np.asarray(coefficients, dtype=np.float64), [np.shape(A)[0] for A in As])
    Qt = stack_product(As, (Yt[:n] @ Tv.T) * column_scale, "right")
    return P, sigma, Qt


def check_same_keys(states: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Every client upload must carry the same tensor names (shapes may differ, e.g. ranks)."""
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            diff = sorted(set(state) ^ keys)
            raise ValueError(f"client upload {i} carries different tensors than upload 0: {diff[:3]}")


def aggregate_extras(states: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray,
                     factor_suffixes: tuple[str, ...]) -> AdapterState:
    """``{key: Σ_k p_k X_k[key]}`` for the tensors that are not low-rank factors (a head, say).

    Strategies that combine the factors in their own way (FLoRA, LoRA-FAIR) average the
    remaining, fully-trained tensors plainly with this.
    """
    check_same_keys(states)
    return weighted_average(states, weights, [k for k in states[0] if not k.endswith(factor_suffixes)])
