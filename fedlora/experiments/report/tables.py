"""Markdown tables of a results directory: paired comparisons per setting, an overview per study, the lr sweeps.

Accuracy and its differences are shown in percentage points, losses as they are; every
interval is the 95 % two-level bootstrap interval of :mod:`fedlora.experiments.report.statistics`.
A row marked † holds a stale result (produced by another code version than the running one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import mean

from fedlora.experiments.grid import NONE
from fedlora.experiments.lr_sweep import SweepScore, choose_lr
from fedlora.experiments.report.collect import CellResult
from fedlora.experiments.report.compare import MAJORITY, Comparison, Row, mean_present
from fedlora.experiments.report.statistics import Interval

STALE_MARK = " †"
MB = 1e6


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def scale_of(metric: str) -> float:
    """Accuracy is shown in percentage points, a loss as it is."""
    return 100.0 if metric == "accuracy" else 1.0


def fmt_interval(interval: Interval | None, metric: str, signed: bool = False) -> str:
    """``45.3 [44.1, 46.5]`` (accuracy in points) or ``+1.2 [+0.3, +2.1]`` for a difference."""
    if interval is None:
        return "–"
    scale, digits = scale_of(metric), 1 if metric == "accuracy" else 3
    sign = "+" if signed else ""
    return (f"{interval.estimate * scale:{sign}.{digits}f} "
            f"[{interval.low * scale:{sign}.{digits}f}, {interval.high * scale:{sign}.{digits}f}]")


def fmt_number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _score_cell(row: Row, metric: str) -> str:
    if row.score is not None:
        return fmt_interval(row.score, metric)
    validation = row.validation()
    return f"val {validation[0]:.3f} ± {validation[1]:.3f}" if validation else "–"


def _mean_of(row: Row, value: Callable[[CellResult], float | None]) -> float | None:
    return mean_present([value(c) for c in row.cells])


def comparison_table(comparison: Comparison) -> str:
    """One row per method: rank, lr, seeds, test score with CI, Δ vs the reference with CI, bytes per round
    (all clients), setup traffic, and under DP the ε spent in the setup phase and in total."""
    metric = comparison.metric
    private = comparison.setting[2] != NONE
    unit = "accuracy %" if metric == "accuracy" else "loss"
    header = ["method", "r", "lr", "seeds", f"test {unit} [95% CI]", f"Δ vs {comparison.reference} [95% CI]",
              "MB/round up", "MB/round down", "setup MB"] + (["setup ε", "final ε"] if private else [])
    lines = []
    for row in comparison.rows:
        majority = row.method == MAJORITY
        name = row.method + (STALE_MARK if row.stale and not majority else "") + (f" ({row.note})" if row.note else "")
        diff = "0 (reference)" if row.method == comparison.reference and row.diff is not None else \
            fmt_interval(row.diff, metric, signed=True)
        rank, lr = row.config_value("lora.rank"), row.config_value("lr")
        cells = [name, "–" if majority or rank is None else str(rank), "–" if majority or lr is None else f"{lr:g}",
                 str(len(row.seeds)), _score_cell(row, metric), diff]
        if majority:
            cells += ["–", "–", "–"] + (["–", "–"] if private else [])
        else:
            cells += [fmt_number(_mean_of(row, lambda c: c.bytes_per_round("up") / MB)),
                      fmt_number(_mean_of(row, lambda c: c.bytes_per_round("down") / MB)),
                      fmt_number(_mean_of(row, lambda c: c.setup_bytes() / MB))]
            if private:
                cells += [fmt_number(_mean_of(row, lambda c: c.setup_epsilon())),
                          fmt_number(_mean_of(row, lambda c: c.summary.get("final_epsilon")))]
        lines.append(cells)
    return markdown(header, lines)


def overview_table(comparisons: list[Comparison], reference: str) -> str:
    """Methods × settings: Δ vs the reference [95% CI] (the reference's own score in its row)."""
    methods = list(dict.fromkeys(r.method for c in comparisons for r in c.rows))
    lines = []
    for method in methods:
        cells = [method]
        for comparison in comparisons:
            row = next((r for r in comparison.rows if r.method == method), None)
            if row is None:
                cells.append("–")
            else:
                shown = fmt_interval(row.diff, comparison.metric, signed=True) if row.diff and method != reference \
                    else _score_cell(row, comparison.metric)
                cells.append(shown + (STALE_MARK if row.stale and method != MAJORITY else ""))
        lines.append(cells)
    return markdown(["method"] + [f"{c.setting[1]} / {c.setting[2]}" for c in comparisons], lines)


def sweep_table(results: list[CellResult], study: str) -> str:
    """The lr sweep of ``study``: mean final validation metric per method × lr, the chosen lr in bold and named in
    the last column, flagged when it is the smallest or largest lr tried (the range may be too narrow)."""
    cells = [r for r in results if r.role == "sweep" and r.study == study]
    if not cells:
        return ""
    values = sorted({float(c.config["lr"]) for c in cells})
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for cell in cells:
        groups.setdefault((cell.method, cell.privacy), []).append(cell)
    lines = []
    for (method, privacy), group in groups.items():
        scores: dict[float, list[SweepScore]] = {}
        for cell in group:
            scores.setdefault(float(cell.config["lr"]), []).append(
                SweepScore(cell.summary.get("final"), cell.summary.get("final_eval_loss")))
        higher = group[0].summary.get("metric", "").endswith("accuracy")
        complete = set(scores) == set(values)
        chosen = choose_lr(scores, higher).lr if complete else None
        row = [method, privacy]
        for lr in values:
            if lr not in scores:
                row.append("–")
                continue
            finite = [s.metric for s in scores[lr] if s.metric is not None and math.isfinite(s.metric)]
            lost = len(scores[lr]) - len(finite)
            text = (fmt_number(mean(finite), 4) if finite else "") + (f" ({lost} diverged)" if lost else "")
            row.append(f"**{text}**" if lr == chosen else text)
        edge = chosen is not None and len(values) > 1 and chosen in (values[0], values[-1])
        row.append("–" if chosen is None else f"{chosen:g}" + (" (edge of the range)" if edge else ""))
        lines.append(row)
    return markdown(["method", "privacy"] + [f"lr {v:g}" for v in values] + ["chosen"], lines)
