"""Bounds on how far any one client can move the global model, applied to every round before aggregation.

Two bounds, each a config key with a default that honest runs do not meet:

* **share cap** (``validation.max-share``, default 0.5): no client's weight exceeds the cap;
  the excess is handed to the others in proportion to their weights ("water-filling"):

      p'_k = min(p_k · c, max_share),  c chosen so that Σ_k p'_k = 1

  so a site that reports ``num-examples = 10**12`` weighs at most ``max_share``. When
  K · max_share < 1 the cap cannot hold for everyone, and every client weighs 1/K.
* **norm bound** (``validation.max-norm-ratio``, default 5): a client's update
  Δ_k = upload_k − reference_k (the tensors it started from: the global state, or zero
  where a tensor has no global counterpart, e.g. FLoRA's fresh factors) may be at most
  ``max_norm_ratio`` times the median norm of the *other* clients' updates; a larger one
  is scaled down to that norm, ``upload'_k = reference_k + (ratio / r_k)·Δ_k``. The median
  of the others (leave-one-out) keeps one large update from raising its own yardstick; a
  round of one client has no yardstick and is not bounded.

Together: ‖Σ_k p'_k Δ'_k‖ ≤ max_share · max_norm_ratio · m + (1 − p'_a) · max_j ‖Δ_j‖ for an
attacker a, with m the median of the honest norms — large but finite, whatever it sends.
This is not Byzantine-robust aggregation: a colluding majority, or small poisoned updates
below the bounds, pass (see the threat model in docs/deployment.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.adapters.state import AdapterState


def capped_shares(weights: np.ndarray, max_share: float) -> np.ndarray:
    """The weights with none above ``max_share``, the excess redistributed in proportion (see the module docstring)."""
    p = np.asarray(weights, dtype=np.float64)
    if max_share >= 1.0 or p.size == 0:
        return p
    if p.size * max_share <= 1.0:
        return np.full(p.size, 1.0 / p.size)
    capped = np.zeros(p.size, dtype=bool)
    out = p.copy()
    while True:
        free = 1.0 - max_share * capped.sum()
        out = np.where(capped, max_share, p * free / p[~capped].sum())
        over = (out > max_share) & ~capped
        if not over.any():
            return out
        capped |= over


def norm_ratios(norms: np.ndarray) -> np.ndarray:
    """r_k = ‖Δ_k‖ / median_{j≠k} ‖Δ_j‖ (1 for a lone client; inf when the others' median is 0 and ‖Δ_k‖ > 0).

    One sort: with s the sorted norms and i_k client k's place in it, element j of the others' sorted
    norms is s[j + (j ≥ i_k)], so every leave-one-out median is one or two lookups.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size < 2:
        return np.ones(norms.size)
    order = np.argsort(norms, kind="stable")
    place = np.empty(norms.size, dtype=np.intp)
    place[order] = np.arange(norms.size)
    ranked = norms[order]
    others = norms.size - 1
    middle = others // 2
    median = ranked[middle + (middle >= place)]
    if others % 2 == 0:
        median = (ranked[middle - 1 + (middle - 1 >= place)] + median) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = norms / median
    return np.where(median > 0, ratio, np.where(norms > 0, np.inf, 1.0))


def scaled_update(upload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], factor: float) -> AdapterState:
    """reference + factor·(upload − reference) per tensor, float32 (a tensor without a same-shaped reference is
    measured and scaled against zero, as :func:`fedlora.server.validation.validate_upload` measures it)."""
    out: AdapterState = {}
    for key, value in upload.items():
        ref = reference.get(key)
        x = np.asarray(value, dtype=np.float64)
        if ref is not None and np.shape(ref) == np.shape(value):
            base = np.asarray(ref, dtype=np.float64)
            out[key] = (base + factor * (x - base)).astype(np.float32)
        else:
            out[key] = (factor * x).astype(np.float32)
    return out
