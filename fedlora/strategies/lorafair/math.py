"""LoRA-FAIR's ridge correction of B and its residuals, in float64 (equations: the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.strategies.traffic import Shapes
from fedlora.strategies.common import (
    Factored, aggregate_extras, check_same_keys, difference, frobenius, ideal_factors, weighted_sum,
)


def ridge_correction(residual: Factored, A_bar: np.ndarray, lam: float) -> np.ndarray:
    """ΔB* = R Āᵀ (ĀĀᵀ + λI)⁻¹ for a residual R = U V (factors, d×k) and Ā (r×k).

    It minimises ‖R − ΔB Ā‖²_F + λ‖ΔB‖²_F (least squares, minimum norm, when λ = 0).
    R Āᵀ = U (V Āᵀ) never forms the d×k residual.
    """
    if lam < 0:
        raise ValueError(f"lorafair.lambda must be >= 0, got {lam}")
    U, V = residual
    gram = A_bar @ A_bar.T + lam * np.eye(A_bar.shape[0])
    # gram is symmetric, so ΔBᵀ = gram⁻¹ (R Āᵀ)ᵀ
    return np.linalg.lstsq(gram, (U @ (V @ A_bar.T)).T, rcond=None)[0].T


def _correct_module(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray,
                    lam: float) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Ā, B̄ + ΔB*, ‖ΔW − B̄Ā‖_F, ‖ΔW − (B̄ + ΔB*)Ā‖_F and ‖ΔW‖_F for one module (float64).

    ΔW, its residuals and their norms stay factored (rank ≤ (K+1)r; :func:`frobenius`),
    so no d×k matrix is ever held.
    """
    A_bar = weighted_sum(As, weights)
    B_bar = weighted_sum(Bs, weights)
    delta_w = ideal_factors(Bs, As, [1.0] * len(Bs), weights)
    residual = difference(delta_w, (B_bar, A_bar))
    B_new = B_bar + ridge_correction(residual, A_bar, lam)
    after = frobenius(difference(delta_w, (B_new, A_bar)))
    return A_bar, B_new, frobenius(residual), after, frobenius(delta_w)


def lorafair_module(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: np.ndarray,
                    lam: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(Ā, B̄ + ΔB*, ‖ΔW − B̄Ā‖_F, ‖ΔW − (B̄ + ΔB*)Ā‖_F) for one module, all in float64."""
    return _correct_module(Bs, As, weights, lam)[:4]


def aggregate_lorafair(states: Sequence[AdapterState], weights: np.ndarray,
                       lam: float) -> tuple[AdapterState, dict[str, float]]:
    """The next global adapter (Ā, B̄ + ΔB*, averaged extras; float32) and its metrics.

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
        A_bar, B_new, res_before, res_after, ideal_norm = _correct_module(Bs, As, weights, lam)
        out[m + LORA_A] = A_bar.astype(np.float32)
        out[m + LORA_B] = B_new.astype(np.float32)
        before += res_before**2
        after += res_after**2
        ideal += ideal_norm**2
    norm = np.sqrt(ideal) if ideal > 0 else 1.0
    rel_after = float(np.sqrt(after) / norm)
    return out, {"residual_before": float(np.sqrt(before) / norm), "residual_after": rel_after, "agg_error": rel_after}


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """As FedIT: the whole adapter both ways (r(d+k) per module, the head); nothing in round 0."""
    return {} if server_round == 0 else dict(adapter)
