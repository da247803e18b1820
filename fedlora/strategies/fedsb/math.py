"""Fed-SB's initialisation from a gradient SVD, its average of R and its (zero) aggregation error, in float64."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.adapters.lora import PEFT_PREFIX
from fedlora.adapters.lorasb import LORASB_A, LORASB_B, LORASB_R
from fedlora.adapters.state import AdapterState
from fedlora.protocol import LORASB_FACTORS
from fedlora.strategies.traffic import Shapes, extras, in_record, lora_dims
from fedlora.strategies.common import averages_with_rounding, check_same_keys
from fedlora.strategies.error_norms import error_ratio, rounding_error2


def lorasb_init(G: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, R0, A) = (U_r, diag(σ_1..σ_r), V_rᵀ) from the SVD G = U Σ Vᵀ, in float64.

    B R0 A is the best rank-r approximation of G: ‖G − B R0 A‖²_F = Σ_{i>r} σ_i². R0 ≠ 0, so
    the adapter starts at ΔW0 = s·B R0 A, not at zero: the caller passes G already scaled to
    the update it wants to start from (e.g. −η·∇W / s for one gradient step of size η).
    """
    G = np.asarray(G, dtype=np.float64)
    if not 0 < r <= min(G.shape):
        raise ValueError(f"LoRA-SB rank {r} must be in 1..{min(G.shape)} for a {G.shape[0]}×{G.shape[1]} gradient")
    U, sigma, Vt = np.linalg.svd(G, full_matrices=False)
    return U[:, :r], np.diag(sigma[:r]), Vt[:r]


def lorasb_init_states(gradients: Mapping[str, np.ndarray], r: int) -> tuple[AdapterState, AdapterState]:
    """(fixed factors ``<m>.lorasb_B/A.weight``, initial ``<m>.lorasb_R.weight``) per module, float32."""
    frozen: AdapterState = {}
    initial: AdapterState = {}
    for m, G in gradients.items():
        B, R0, A = lorasb_init(G, r)
        frozen[m + LORASB_B] = B.astype(np.float32)
        frozen[m + LORASB_A] = A.astype(np.float32)
        initial[m + LORASB_R] = R0.astype(np.float32)
    return frozen, initial


def average_with_error(states: Sequence[AdapterState], weights: np.ndarray, frozen: AdapterState, scale: float,
                       measure: bool = True) -> tuple[AdapterState, dict[str, float]]:
    """R̄ (+ head), float32, and, when ``measure``, ``agg_error`` = ‖s·B R̄₃₂ A − Σ_k p_k s·B R_k A‖ / ‖Σ_k p_k s·B R_k A‖.

    By linearity the ideal is s·B R̄ A with the exact R̄; the error is the float32 rounding of the
    stored R̄ between the fixed B and A, from their r×r Grams BᵀB and AAᵀ
    (:func:`fedlora.strategies.error_norms.rounding_error2`). Uploads must hold no B or A.
    """
    check_same_keys(states)
    if any(k.endswith((LORASB_A, LORASB_B)) for k in states[0]):
        raise ValueError("Fed-SB uploads must not contain the fixed B or A")

    def rounding(key: str, exact: np.ndarray, stored: np.ndarray) -> tuple[float, float] | None:
        if not key.endswith(LORASB_R):
            return None
        module = key[: -len(LORASB_R)]
        B, A = np.asarray(frozen[module + LORASB_B]), np.asarray(frozen[module + LORASB_A])
        return rounding_error2(exact, stored, A @ A.T, scale, left_gram=B.T @ B)  # r×r Grams in B's and A's precision

    stored, errors = averages_with_rounding(states, weights, states[0].keys(), rounding if measure else None)
    return stored, ({"agg_error": error_ratio(errors)} if measure else {})


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Round 0: a dense d×k gradient per module, up. Then R (r²) and the head both ways, plus B
    and A (r(d+k)) down in round 1. LoRA-SB's names carry no peft prefix."""
    plain = {m.removeprefix(PEFT_PREFIX): dims for m, dims in lora_dims(adapter).items()}
    if server_round == 0:
        return {m: (d, k) for m, (d, k, _) in plain.items()} if direction == "up" else {}
    out = {k.removeprefix(PEFT_PREFIX): v for k, v in extras(adapter).items()}
    for m, (d, k, r) in plain.items():
        out[m + LORASB_R] = (r, r)
        if direction == "down" and server_round == 1:
            out.update(in_record(LORASB_FACTORS, {m + LORASB_B: (d, r), m + LORASB_A: (r, k)}))
    return out
