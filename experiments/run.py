"""Sweep a grid and write its report: ``python -m experiments.run GRID.toml --out DIR``.

Runs every unfinished cell (``--launcher inprocess``, the default, or ``flwr`` for real
``flwr run`` simulations), then writes into ``DIR``: ``grid.toml`` (a copy of the grid),
``results.csv``, ``results.md`` and the PNG plots. ``--report-only`` rebuilds the report
from the run directories without running anything. Exits 1 when a cell failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from experiments.collect import load_results, write_csv
from experiments.grid import load_grid
from experiments.plots import write_plots
from experiments.sweep import LAUNCHERS, run_sweep
from experiments.table import results_markdown


def write_report(grid_path: Path, out: Path) -> list[Path]:
    """results.csv, results.md and plots for every finished cell of the grid under ``out``."""
    grid = load_grid(grid_path)
    results = load_results(grid, out)
    write_csv(results, out / "results.csv")
    (out / "results.md").write_text(results_markdown(results, grid, len(grid.cells())), encoding="utf-8")
    return [out / "results.csv", out / "results.md", *write_plots(results, grid, out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a fedlora experiment grid and write results.csv, results.md and plots.")
    parser.add_argument("grid", type=Path, help="grid TOML file (see experiments/grids/)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (run directories go to OUT/runs/)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="inprocess",
                        help="inprocess (default: ServerApp + ClientApp in this process) or flwr (real `flwr run`)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.grid.resolve() != (out / "grid.toml"):
        shutil.copyfile(args.grid, out / "grid.toml")
    failed = []
    if not args.report_only:
        started = time.monotonic()
        outcomes = run_sweep(grid, out, args.launcher)
        failed = [o for o in outcomes if o.status.startswith("failed")]
        ran = sum(o.status == "done" for o in outcomes)
        print(f"[sweep] {ran} cells run, {sum(o.status == 'skipped' for o in outcomes)} skipped, {len(failed)} failed "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        for outcome in failed:
            print(f"[sweep] {outcome.cell.name}: {outcome.status}", flush=True)
    for path in write_report(args.grid, out):
        print(f"[sweep] wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
