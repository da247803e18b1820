"""``fedlora grid GRID.toml --out DIR``: run a grid's cells, then write its report.

Checks that every study's dataset can be read (a missing package is one line with its install
command), runs every cell that is not finished with this config and this code version
(:mod:`~fedlora.experiments.sweep`; ``--launcher inprocess``, the default, or ``flwr`` for real
``flwr run`` simulations; ``--workers N`` runs N cells at a time), then writes into ``DIR``: ``grid.toml`` (a copy of the grid) and the
report of ``fedlora report DIR`` (:mod:`fedlora.experiments.report`). ``--status`` lists every
cell's status without running anything; ``--report-only`` only rebuilds the report;
``--reuse-stale`` accepts results of other code versions (then every table marks them); either way one
line says how many finished cells came from other code, and which versions.
Exits 1 when a cell failed, 2 when the grid file is invalid or a dataset cannot be read (one line on stderr,
naming the file, the study and the bad value; ``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from fedlora.data.sources import load_task_data
from fedlora.experiments.cells import STALE, run_dir_of, summary_of_its_run
from fedlora.experiments.grid import Cell, Grid, GridError, load_grid
from fedlora.experiments.report import write_report
from fedlora.experiments.sweep import LAUNCHERS, Plan, cell_states, run_sweep
from fedlora.run_config import full_defaults, load_config
from fedlora.server.rundir import RUNNING_CODE_VERSION


def check_datasets(grid: Grid) -> str | None:
    """None when every study's dataset loads, else the first problem in one line."""
    for study in grid.studies:
        cfg = load_config({**full_defaults(), **grid.base, **study.base})
        try:
            load_task_data(cfg.dataset, cfg.seed).train
        except (ValueError, OSError) as err:
            return f"study {study.name!r}: dataset {cfg.dataset.name!r}: {err}"
    return None


def stale_notice(plan: Plan, states: list[tuple[Cell, str]]) -> str | None:
    """One line when finished cells of this grid (``states``: :func:`cell_states`) came from other code than the
    running version, else None."""
    stale = [cell for cell, status in states if status == STALE]
    if not stale:
        return None
    versions = Counter(str((summary_of_its_run(run_dir_of(plan.out, c)) or {}).get("code_version")) for c in stale)
    listed = ", ".join(f"{v} ({n})" for v, n in versions.most_common())
    what = ("are reused, marked † in every table" if plan.reuse_stale else
            "will be rerun; --reuse-stale keeps them (marked †), or run the grid from a checkout of their code "
            "(experiments/README.md)")
    return (f"[grid] {len(stale)} finished cell(s) came from other code ({listed}) than the running version "
            f"{RUNNING_CODE_VERSION}: they {what}")


def print_status(states: list[tuple[Cell, str]]) -> None:
    """One line per cell that is not finished, then the counts per study and status."""
    counts: Counter[tuple[str, str]] = Counter()
    for cell, status in states:
        counts[(cell.study, status.partition(":")[0])] += 1
        if status != "finished":
            print(f"{cell.label()} {status}", flush=True)
    for (study, status), count in sorted(counts.items()):
        print(f"[grid] {study or '(grid)'}: {count} {status}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora grid", description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="grid TOML file (see experiments/grids/)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (run directories go to OUT/runs/)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="inprocess",
                        help="inprocess (default: ServerApp + ClientApp in this process) or flwr (real `flwr run`)")
    parser.add_argument("--workers", type=int, default=1,
                        help="cells run at a time, in worker processes sharing the CPU threads (default 1)")
    parser.add_argument("--reuse-stale", action="store_true",
                        help="reuse results of other code versions instead of rerunning them (marked in every table)")
    parser.add_argument("--status", action="store_true", help="list every cell's status; run nothing")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--debug", action="store_true", help="a traceback with an invalid grid file")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except (GridError, OSError) as err:
        if args.debug:
            raise
        print(f"fedlora grid: {err}", file=sys.stderr, flush=True)
        return 2
    out = args.out.resolve()
    plan = Plan(grid, out, reuse_stale=args.reuse_stale)
    if args.status:
        states = cell_states(plan)
        print_status(states)
        notice = stale_notice(plan, states)
        if notice:
            print(notice, flush=True)
        return 0
    if not args.report_only:
        problem = check_datasets(grid)
        if problem:
            print(f"[grid] {problem}", flush=True)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.grid.resolve() != (out / "grid.toml"):
        shutil.copyfile(args.grid, out / "grid.toml")
    failed = []
    if not args.report_only:
        notice = stale_notice(plan, cell_states(plan))
        if notice:
            print(notice, flush=True)
        started = time.monotonic()
        outcomes = run_sweep(plan, args.launcher, args.workers)
        failed = [o for o in outcomes if o.status.startswith("failed")]
        counts = Counter(o.status.partition(":")[0] for o in outcomes)
        print(f"[grid] {counts['done']} cells run, {counts['skipped']} skipped, {counts['reused stale']} reused stale, "
              f"{counts['waiting']} waiting, {len(failed)} failed in {time.monotonic() - started:.0f} s", flush=True)
        for outcome in failed:
            print(f"[grid] {outcome.cell.name}: {outcome.status}", flush=True)
    for path in write_report(out, grid.reference):
        print(f"[grid] wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
