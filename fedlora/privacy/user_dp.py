"""User-level DP at the server (DP-FedAvg): clip each client's whole update, average, add noise.

With m client updates Δ_k (all adapter tensors of one client taken together as one vector),

    clip(Δ, C)   = Δ · min(1, C / ‖Δ‖₂)
    release      = (1/m) Σ_k clip(Δ_k, C) + N(0, (σC/m)² I).

Adding or removing one client changes the sum by at most C in L2, so with m treated as
public (fixed-size sampling of m of N clients) the mean has sensitivity C/m and the
release is a Gaussian mechanism with noise multiplier σ. The average is *unweighted*:
num-examples weights would let one client's weight, and so the sensitivity, grow. The
accountant composes rounds as a subsampled Gaussian with rate q = m/N (the Opacus
analyses assume Poisson sampling; fixed-size sampling at q = m/N is the usual
approximation). This is only valid when the server releases one linear average: a
strategy's ``Capabilities.linear`` says whether it does, and
:class:`fedlora.privacy.user_level.UserLevelDP` applies this release around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedlora.adapters.state import AdapterState
from fedlora.privacy.accounting import history_of

def update_norm(delta: AdapterState) -> float:
    """Joint L2 norm of all tensors of one client update, in float64."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in delta.values()))


def clip_update(delta: AdapterState, max_norm: float) -> AdapterState:
    """Scale the whole update by min(1, C / ‖Δ‖₂), so that its joint norm is at most C; dtypes kept."""
    if max_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {max_norm}")
    norm = update_norm(delta)
    factor = 1.0 if norm <= max_norm else max_norm / norm
    return {k: (np.asarray(v, dtype=np.float64) * factor).astype(np.asarray(v).dtype) for k, v in delta.items()}


def noisy_average(deltas: Sequence[AdapterState], max_norm: float, noise_multiplier: float,
                  rng: np.random.Generator) -> AdapterState:
    """(1/m) Σ clip(Δ_k, C) + N(0, (σC/m)²) per coordinate, computed in float64, returned in the input dtypes."""
    if not deltas:
        raise ValueError("noisy_average needs at least one client update")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    keys = set(deltas[0])
    for i, d in enumerate(deltas[1:], start=1):
        if set(d) != keys:
            raise ValueError(f"client update {i} has different tensors than update 0: {sorted(set(d) ^ keys)[:3]}")
    m = len(deltas)
    clipped = [clip_update(d, max_norm) for d in deltas]
    std = noise_multiplier * max_norm / m
    out: AdapterState = {}
    for key in deltas[0]:
        mean = sum(np.asarray(c[key], dtype=np.float64) for c in clipped) / m
        if std > 0:
            mean = mean + rng.normal(0.0, std, size=mean.shape)
        out[key] = mean.astype(np.asarray(deltas[0][key]).dtype)
    return out


def user_level_epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Cumulative user-level ε of rounds given as (σ, q = m/N, rounds) entries; each round is one mechanism."""
    return history_of(history).epsilon(delta, accountant)
