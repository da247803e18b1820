"""Markdown tables of a sweep: mean ± std over seeds for every (partition, privacy, strategy) cell."""

from __future__ import annotations

from statistics import mean, stdev
from typing import Any

from experiments.collect import CellResult
from experiments.grid import Grid


def mean_std(values: list[float], digits: int = 4) -> str:
    """``m ± s`` (sample std over seeds); a single seed shows as ``m (n=1)``; no values as ``-``."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f}"


def groups(results: list[CellResult]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rows grouped by (partition, privacy, strategy), in the order they first appear."""
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for result in results:
        row = result.row
        grouped.setdefault((row["partition"], row["privacy"], row["strategy"]), []).append(row)
    return grouped


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cell_table(results: list[CellResult]) -> str:
    """One row per (partition, privacy, strategy): final and best metric, bytes, ε, wall time."""
    header = ["partition", "privacy", "strategy", "seeds", "final", "best", "MB up", "MB down", "final ε", "wall s"]
    rows = []
    for (partition, privacy, strategy), items in groups(results).items():
        rows.append([partition, privacy, strategy, str(len(items)),
                     mean_std([r["final"] for r in items]), mean_std([r["best"] for r in items]),
                     f"{mean(r['bytes_up'] for r in items) / 1e6:.2f}", f"{mean(r['bytes_down'] for r in items) / 1e6:.2f}",
                     mean_std([r["final_epsilon"] for r in items], 2), f"{mean(r['wall_seconds'] for r in items):.0f}"])
    return _markdown(header, rows)


def pivot_table(results: list[CellResult], grid: Grid) -> str:
    """Final metric (mean ± std over seeds): strategies as rows, partition × privacy settings as columns."""
    grouped = groups(results)
    settings = [(p, q) for q in grid.privacy for p in grid.partitions]
    strategies = list(dict.fromkeys(key[2] for key in grouped))
    rows = []
    for strategy in strategies:
        cells = []
        for partition, privacy in settings:
            items = grouped.get((partition, privacy, strategy)) or grouped.get(("pooled", privacy, strategy), [])
            cells.append(mean_std([r["final"] for r in items]))
        rows.append([strategy, *cells])
    return _markdown(["strategy", *(f"{p} / {q}" for p, q in settings)], rows)


def results_markdown(results: list[CellResult], grid: Grid, expected_cells: int) -> str:
    """The whole ``results.md``: what finished, the pivot table and the per-cell table."""
    if not results:
        return f"# Sweep `{grid.name}`\n\nNo cell has finished yet (0/{expected_cells}).\n"
    metric = results[0].row["metric"]
    direction = "higher is better" if metric == "eval_accuracy" else "lower is better"
    return "\n".join([
        f"# Sweep `{grid.name}`", "",
        f"{len(results)}/{expected_cells} cells finished. Metric: held-out `{metric}` ({direction}), "
        "mean ± sample std over seeds. `centralized` (pooled data, partition-independent) and "
        "`local-only` (mean over clients) are non-private reference points with 0 bytes communicated.", "",
        f"## Final {metric}", "", pivot_table(results, grid), "",
        "## Per cell", "", cell_table(results), "",
    ])
