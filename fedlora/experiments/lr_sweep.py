"""Each method's learning rate, chosen on the validation split — never on the test split.

A study's ``lr-sweep`` runs every method (and baseline) at each candidate lr in a few
settings (sweep seeds × sweep partitions) at one representative privacy level per class
(non-private, private). The choice for a (method, class) is the lr whose final-round
validation metric (``summary.json``'s ``final``: accuracy, or perplexity for instruction
tasks), averaged over those settings, is best; ties go to the lower mean final validation
loss, then to the smaller lr. A run that diverged (no finite metric) counts as the worst.
The main cells of that method and class then run at the chosen lr, which their
``cell.json`` records together with every candidate's mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SweepScore:
    """One finished sweep cell's final validation metric and loss (None when the run produced none)."""

    metric: float | None
    loss: float | None


@dataclass(frozen=True)
class LrChoice:
    """The chosen lr and the mean final validation metric of every candidate."""

    lr: float
    means: dict[float, float]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _mean(values: Sequence[float | None], worst: float) -> float:
    """Mean with every missing or non-finite value replaced by ``worst``."""
    return sum(v if _finite(v) else worst for v in values) / len(values)  # type: ignore[misc]


def choose_lr(scores: Mapping[float, Sequence[SweepScore]], higher_is_better: bool) -> LrChoice:
    """The best lr of ``scores`` (lr -> the scores of its sweep cells), as the module docstring says."""
    if not scores or any(not cells for cells in scores.values()):
        raise ValueError("every candidate lr needs at least one finished sweep cell")
    worst = -math.inf if higher_is_better else math.inf
    means = {lr: _mean([s.metric for s in cells], worst) for lr, cells in scores.items()}
    losses = {lr: _mean([s.loss for s in cells], math.inf) for lr, cells in scores.items()}
    sign = -1.0 if higher_is_better else 1.0
    best = min(scores, key=lambda lr: (sign * means[lr], losses[lr], lr))
    return LrChoice(lr=best, means=dict(sorted(means.items())))
