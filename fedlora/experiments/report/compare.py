"""One setting's comparison: every method's test score and its paired difference to the reference, with CIs.

A setting is a (study, partition, privacy) triple. Its rows are the reference method, the
other methods of the setting's main cells (by name), then the study's local-only and centralized
baselines (no DP; centralized on pooled data) and, for classification runs with a test split,
the majority-class baseline (always the most frequent training label).
Methods are paired with the reference seed by seed on the seeds both have; every run of a
comparison must have scored the same test split (same fingerprint), or the row says it is
not paired. Classification compares test accuracy (higher is better); instruction tasks
compare the test token loss (lower is better). A method without per-example test results
(a run without a test split) shows its final validation metric, mean ± std over seeds, unpaired.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from statistics import mean, stdev

import numpy as np

from fedlora.experiments.grid import NONE, POOLED, alpha_of, epsilon_of
from fedlora.experiments.report.collect import CellResult
from fedlora.experiments.report.statistics import Interval, Scores, bootstrap_intervals

MAJORITY = "majority class"
CENTRALIZED = "centralized"


def mean_present(values: list[float | None]) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    present = [float(v) for v in values if v is not None]
    return mean(present) if present else None


@dataclass
class Row:
    """One method's line of a comparison."""

    method: str
    cells: list[CellResult]
    score: Interval | None = None
    diff: Interval | None = None
    note: str = ""

    @property
    def stale(self) -> bool:
        return any(c.stale for c in self.cells)

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.cells})

    def config_value(self, key: str) -> object:
        """A config value shared by every cell (the first cell's when they differ — they do not in a grid)."""
        return self.cells[0].config.get(key) if self.cells else None

    def validation(self) -> tuple[float, float] | None:
        """Final validation metric: mean and sample std over seeds (std 0 for one seed)."""
        values = [float(c.summary["final"]) for c in self.cells if c.summary.get("final") is not None]
        if not values:
            return None
        return mean(values), (stdev(values) if len(values) > 1 else 0.0)


@dataclass
class Comparison:
    """A setting's rows, the reference and the metric compared."""

    setting: tuple[str, str, str]
    reference: str
    metric: str  # "accuracy" or "loss"
    rows: list[Row]

    def row(self, method: str) -> Row:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"no method {method!r} in setting {'/'.join(self.setting)}; methods: {[r.method for r in self.rows]}")


def scores_of(cells: list[CellResult], task: str) -> Scores:
    """Per-seed, per-example scores of ``cells`` (one per seed, in the given order)."""
    tests = [c.test for c in cells]
    if any(t is None for t in tests):
        raise ValueError("a cell has no test_predictions.npz")
    if task == "classification":
        return Scores(np.stack([t.correct for t in tests]), np.ones((len(tests), len(tests[0].correct))))
    return Scores(np.stack([t.loss for t in tests]), np.stack([t.tokens for t in tests]))


def majority_scores(cells: list[CellResult]) -> Scores:
    """The majority-class baseline on the test split of each of ``cells``' seeds."""
    return Scores.of(np.stack([(c.test.label == c.test.majority_label).astype(np.float64) for c in cells]))


def _row(method: str, cells: list[CellResult]) -> Row:
    """A row of one run per seed: of several runs with the same seed (hand-made runs), the last by path."""
    kept = list(_by_seed(cells).values())
    note = f"{len(cells) - len(kept)} run(s) with a repeated seed left out" if len(kept) < len(cells) else ""
    return Row(method, kept, note=note)


def _by_seed(cells: list[CellResult]) -> dict[int, CellResult]:
    return {c.seed: c for c in cells}


def clipped(interval: Interval, low: float, high: float) -> Interval:
    """``interval`` with its ends moved into [low, high] (few seeds can reach past a bounded metric's range)."""
    return replace(interval, low=min(max(interval.low, low), high), high=min(max(interval.high, low), high))


def _pairable(row: Row, reference: dict[int, CellResult]) -> tuple[int, ...]:
    """The seeds on which ``row`` can be paired with the reference; () with ``row.note`` saying why not."""
    seeds = tuple(sorted(set(_by_seed(row.cells)) & set(reference)))
    cells = row.cells + [reference[s] for s in seeds]
    if not seeds:
        row.add_note("no seed in common with the reference")
    elif any(c.test is None for c in cells):
        row.add_note("no test split")
    elif len({c.test.fingerprint for c in cells}) != 1:
        row.add_note("not paired: the runs scored different test splits")
    else:
        return seeds
    return ()


def _fill_intervals(rows: list[Row], reference_cells: list[CellResult], task: str, replicates: int) -> None:
    """Every pairable row's score and difference to the reference, one bootstrap per set of common seeds."""
    reference = _by_seed(reference_cells)
    groups: dict[tuple[int, ...], list[Row]] = {}
    for row in rows:
        seeds = _pairable(row, reference)
        if seeds:
            groups.setdefault(seeds, []).append(row)
    for seeds, group in groups.items():
        ref = [reference[s] for s in seeds]
        others = {row.method: majority_scores(ref) if row.method == MAJORITY else
                  scores_of([_by_seed(row.cells)[s] for s in seeds], task) for row in group}
        intervals = bootstrap_intervals(scores_of(ref, task), others, replicates)
        for row in group:
            row.score, row.diff = intervals[row.method]
            if task == "classification":  # accuracy lies in [0, 1]: so do its interval's ends
                row.score, row.diff = clipped(row.score, 0.0, 1.0), clipped(row.diff, -1.0, 1.0)
            if len(seeds) < len(row.seeds):
                row.add_note(f"paired on seeds {list(seeds)}")


def compare(results: list[CellResult], setting: tuple[str, str, str], reference: str,
            replicates: int = 2000) -> Comparison:
    """The comparison of ``setting`` (see the module docstring) over the main and baseline cells of ``results``."""
    study, partition, privacy = setting
    main = [r for r in results if r.role == "main" and r.setting == setting]
    if not main:
        raise KeyError(f"no finished main cell in setting {'/'.join(setting)}")
    task = main[0].task
    methods = sorted({r.method for r in main})
    if reference not in methods:
        raise KeyError(f"the reference {reference!r} has no finished cell in setting {'/'.join(setting)}")
    order = [reference] + [m for m in methods if m != reference]
    rows = [_row(m, [r for r in main if r.method == m]) for m in order]
    local = [r for r in results if r.role == "baseline" and r.method == "local-only" and r.setting == (study, partition, NONE)]
    central = [r for r in results if r.role == "baseline" and r.method == CENTRALIZED and r.setting == (study, POOLED, NONE)]
    rows += [_row(f"{name} (no DP)", cells) for name, cells in (("local-only", local), (CENTRALIZED, central)) if cells]
    reference_cells = rows[0].cells
    if task == "classification" and all(c.test is not None for c in reference_cells):
        rows.append(Row(MAJORITY, reference_cells))
    _fill_intervals(rows, reference_cells, task, replicates)
    return Comparison(setting=setting, reference=reference, metric="accuracy" if task == "classification" else "loss",
                      rows=rows)


def settings(results: list[CellResult]) -> list[tuple[str, str, str]]:
    """Every (study, partition, privacy) with finished main cells: studies as the results list them, then no DP
    before decreasing ε, then iid before decreasing Dirichlet α (other partitions last)."""
    found = list(dict.fromkeys(r.setting for r in results if r.role == "main"))
    studies = list(dict.fromkeys(s[0] for s in found))

    def order(setting: tuple[str, str, str]) -> tuple[int, float, float, str]:
        alpha = alpha_of(setting[1])
        return studies.index(setting[0]), -epsilon_of(setting[2]), -(alpha if alpha == alpha else -1.0), setting[1]

    return sorted(found, key=order)
