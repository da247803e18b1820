"""Paired comparisons with bootstrap confidence intervals over test examples and seeds (vectorised numpy).

A method's result is a matrix per quantity: row s = seed s, column i = test example i (every
run of a comparison scores the same test split in the same order, so columns are the same
examples everywhere, and seed s means the same partitions and initialisation for every method).
For seed s the method's score is a ratio over examples,

    θ_s = Σ_i num[s, i] / Σ_i den[s, i]

— accuracy with num = correct and den = 1, or the token loss with num = summed NLL and den =
tokens — and the method's score is the mean over seeds, θ = (1/S) Σ_s θ_s. The paired
difference of methods a and b is Δ = θ_a − θ_b.

**Replicates.** A two-level bootstrap resamples seeds and test examples independently (Owen's
"pigeonhole" bootstrap for crossed factors): replicate r draws seed counts v_r (S draws with
replacement) and example counts w_r (n draws), the *same* for both methods, and computes

    Δ_r = (1/S) Σ_s v_r[s] · ( (w_r·num_a[s]) / (w_r·den_a[s]) − (w_r·num_b[s]) / (w_r·den_b[s]) ).

**Scale.** Write the per-example differences as d[s, i] = μ + α_s + β_i + ε_si (seed, example
and interaction effects). Then Var Δ = σ²_α/S + σ²_β/n + σ²_ε/(Sn), but the pigeonhole
replicates vary by about σ²_α/S + σ²_β/n + 3σ²_ε/(Sn): they count the interaction three times,
which for paired model comparisons (whose disagreements flip from seed to seed) makes intervals
up to √3 too wide. So the replicates are rescaled about Δ to the two-way variance-components
estimate (each component truncated at 0; δ are the linearised per-example contributions, so
that Σ_i δ[s, i] = 0 for every seed):

    V = max(0, V_seed − r) + max(0, V_example − r) + r,   r = MSE / (S n),
    V_seed = var_s(Δ_s) / S,   V_example = var_i(mean_s δ[s, i]) / n,
    MSE = Σ_s,i (δ[s, i] − mean_s δ[s, i])² / ((S − 1)(n − 1)),

keeping the replicates' shape. V rests on few seeds: its Welch–Satterthwaite degrees of freedom
ν = V² / (V_seed²/(S−1) + V_example²/(n−1)) widen the replicates further by t_ν / z at the
interval's level, as a t interval would be. (Simulated with 3–10 seeds, seed-, example- and
interaction-dominated differences: 95–98% coverage; the plain pigeonhole bootstrap gives ~100%
when the interaction dominates and ~90% when the seeds do.) With one seed
nothing estimates the seed effect and the replicates are the plain example bootstrap. The
interval is the percentile interval of the rescaled replicates. Identical methods give exactly [0, 0]; a method that is b shifted by a
constant c on every example gives exactly [c, c]. A method's own score θ gets its interval the
same way (b = 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

REPLICATES = 2000
LEVEL = 0.95
#: replicates computed together: bounds the (chunk × examples) count matrix's memory
CHUNK = 250


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval, with the seeds and examples behind it."""

    estimate: float
    low: float
    high: float
    seeds: int
    examples: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Scores:
    """A method's per-seed, per-example numerators and denominators (both S × n)."""

    num: np.ndarray
    den: np.ndarray

    def __post_init__(self) -> None:
        if self.num.shape != self.den.shape or self.num.ndim != 2 or 0 in self.num.shape:
            raise ValueError(f"scores must be two non-empty S×n arrays of one shape; got {self.num.shape}, {self.den.shape}")

    @classmethod
    def of(cls, values: np.ndarray) -> "Scores":
        """Scores that are means of ``values`` (S × n), e.g. 0/1 correctness: den = 1."""
        values = np.atleast_2d(np.asarray(values, np.float64))
        return cls(values, np.ones_like(values))

    def per_seed(self) -> np.ndarray:
        """θ_s for every seed."""
        return self.num.sum(axis=1) / self.den.sum(axis=1)

    def mean(self) -> float:
        """θ: the mean over seeds of θ_s."""
        return float(self.per_seed().mean())

    def linearised(self) -> np.ndarray:
        """Each example's contribution to its seed's θ_s: (num − θ_s·den) / mean(den), S × n (rows sum to 0)."""
        theta = self.per_seed()[:, None]
        return (self.num - theta * self.den) / self.den.mean(axis=1, keepdims=True)


def resample_counts(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``replicates`` samples of n draws with replacement
    (replicates × n, float64; every row sums to n)."""
    draws = rng.integers(0, n, size=(replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def variance_estimate(per_seed: np.ndarray, linearised: np.ndarray) -> tuple[float, float]:
    """The two-way variance-components estimate V of the mean over seeds and its Welch–Satterthwaite degrees of
    freedom (module docstring); needs at least two seeds and two examples."""
    seeds, examples = linearised.shape
    example_means = linearised.mean(axis=0)
    v_example = float(example_means.var(ddof=1)) / examples
    v_seed = float(per_seed.var(ddof=1)) / seeds
    mse = float(((linearised - example_means) ** 2).sum()) / ((seeds - 1) * (examples - 1))
    r = mse / (seeds * examples)
    variance = max(0.0, v_seed - r) + max(0.0, v_example - r) + r
    spread = v_seed**2 / (seeds - 1) + v_example**2 / (examples - 1)
    return variance, (variance**2 / spread if spread > 0 else np.inf)


def _replicate_scores(scores: Scores, weights: np.ndarray) -> np.ndarray:
    """θ_s of each replicate's example counts (replicates × S)."""
    return (weights @ scores.num.T) / (weights @ scores.den.T)


def _interval(estimate: float, replicated: np.ndarray, per_seed: np.ndarray, linearised: np.ndarray,
              level: float) -> Interval:
    """The percentile interval of ``replicated`` after rescaling its spread about ``estimate`` to the
    variance-components estimate, widened by t_ν / z (module docstring)."""
    shape = linearised.shape
    spread = float(replicated.var())
    if spread == 0:
        replicated = np.full_like(replicated, estimate)
    elif shape[0] > 1 and shape[1] > 1:
        variance, dof = variance_estimate(per_seed, linearised)
        quantile = (1 + level) / 2
        widen = float(stats.t.ppf(quantile, dof) / stats.norm.ppf(quantile)) if np.isfinite(dof) else 1.0
        replicated = estimate + (replicated - replicated.mean()) * np.sqrt(variance / spread) * widen
    low, high = np.quantile(replicated, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate=estimate, low=float(low), high=float(high), seeds=shape[0], examples=shape[1])


def bootstrap_intervals(reference: Scores, others: Mapping[str, Scores], replicates: int = REPLICATES,
                        level: float = LEVEL, seed: int = 0) -> dict[str, tuple[Interval, Interval]]:
    """For every method of ``others`` (and the reference, under the key ``""``): (its score θ with its interval,
    its paired difference θ − θ_reference with its interval), all from the same bootstrap replicates."""
    shape = reference.num.shape
    wrong = {name: s.num.shape for name, s in others.items() if s.num.shape != shape}
    if wrong:
        raise ValueError(f"paired scores need the reference's seeds × examples {shape}; got {wrong}")
    methods = {"": reference, **others}
    seeds, examples = shape
    rng = np.random.default_rng(seed)
    scores = {name: np.empty(replicates) for name in methods}
    deltas = {name: np.empty(replicates) for name in methods}
    for start in range(0, replicates, CHUNK):
        size = min(CHUNK, replicates - start)
        weights = resample_counts(rng, size, examples)
        seed_counts = resample_counts(rng, size, seeds)
        reference_per_seed = _replicate_scores(reference, weights)
        for name, method in methods.items():
            per_seed = reference_per_seed if name == "" else _replicate_scores(method, weights)
            scores[name][start : start + size] = (seed_counts * per_seed).sum(axis=1) / seeds
            deltas[name][start : start + size] = (seed_counts * (per_seed - reference_per_seed)).sum(axis=1) / seeds
    reference_linear, reference_per_seed = reference.linearised(), reference.per_seed()
    results = {}
    for name, method in methods.items():
        linear, per_seed = method.linearised(), method.per_seed()
        score = _interval(method.mean(), scores[name], per_seed, linear, level)
        diff = _interval(method.mean() - reference.mean(), deltas[name], per_seed - reference_per_seed,
                         linear - reference_linear, level)
        results[name] = (score, diff)
    return results
