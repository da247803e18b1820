"""Read a sweep's finished run directories back into rows: ``results.csv`` and per-round curves."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.grid import Cell, Grid
from experiments.sweep import expected_config, is_finished, run_dir_of

COLUMNS = ["strategy", "partition", "privacy", "seed", "metric", "initial", "final", "best", "best_round",
           "final_eval_loss", "bytes_up", "bytes_down", "final_epsilon", "wall_seconds"]


@dataclass
class CellResult:
    """One finished cell: its summary row and its metrics.jsonl records."""

    cell: Cell
    row: dict[str, Any]
    rounds: list[dict[str, Any]]


def load_result(grid: Grid, out: Path, cell: Cell) -> CellResult | None:
    """The cell's result when its run directory is finished with the grid's config, else None."""
    run_dir = run_dir_of(out, cell)
    if not is_finished(run_dir, expected_config(grid, cell, run_dir)):
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = {
        "strategy": cell.strategy, "partition": cell.partition, "privacy": cell.privacy, "seed": cell.seed,
        "metric": summary["metric"], "initial": summary["initial"], "final": summary["final"],
        "best": summary["best"], "best_round": summary["best_round"], "final_eval_loss": summary["final_eval_loss"],
        "bytes_up": int(summary["total_bytes_up"]), "bytes_down": int(summary["total_bytes_down"]),
        "final_epsilon": summary["final_epsilon"], "wall_seconds": round(summary["wall_seconds"], 1),
    }
    return CellResult(cell, row, rounds)


def load_results(grid: Grid, out: Path) -> list[CellResult]:
    """Every finished cell of the grid, in grid order."""
    return [r for cell in grid.cells() if (r := load_result(grid, out, cell)) is not None]


def write_csv(results: list[CellResult], path: Path) -> None:
    """``results.csv``: one row per cell × seed."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow({k: ("" if v is None else v) for k, v in result.row.items()})
