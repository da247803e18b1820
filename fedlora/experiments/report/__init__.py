"""``fedlora report RESULTS_DIR``: any results directory as paired comparisons with confidence intervals.

Reads every run directory below RESULTS_DIR (:mod:`~fedlora.experiments.report.collect`) and
writes into it ``results.csv`` (one row per run), ``report.md`` (per setting: every method's
test score and its paired difference to the reference with 95% bootstrap intervals over test
examples and seeds, the majority-class and centralized baselines, bytes, the ε spent in a
setup phase; per study an overview and the lr sweep) and the plots
(:mod:`~fedlora.experiments.report.plots`). With ``--doc FILE`` it renders the markers of a
results document from the data (:mod:`~fedlora.experiments.report.results_doc`); with
``--doc FILE --check`` it only checks them and exits 1 on any mismatch.

This package only analyses results: it is not part of the code version that keys cells.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlora.experiments.grid import DEFAULT_REFERENCE, Grid, load_grid
from fedlora.experiments.report.collect import CellResult, load_results, write_csv
from fedlora.experiments.report.compare import Comparison, compare, settings
from fedlora.experiments.report.page import report_markdown
from fedlora.experiments.report.plots import write_plots
from fedlora.experiments.report.results_doc import DocError, Evaluator, check_file, render_file
from fedlora.experiments.report.statistics import REPLICATES


def grid_of(root: Path) -> Grid | None:
    """The grid that wrote ``root`` (its ``grid.toml``), else None."""
    grid = root / "grid.toml"
    return load_grid(grid) if grid.is_file() else None


def grid_reference(root: Path) -> str:
    """The reference strategy of the grid that wrote ``root``, else fedavg."""
    grid = grid_of(root)
    return grid.reference if grid is not None else DEFAULT_REFERENCE


def comparisons_of(results: list[CellResult], reference: str, replicates: int) -> dict[tuple[str, str, str], Comparison]:
    """The comparison of every setting whose main cells include the reference."""
    found = {}
    for setting in settings(results):
        try:
            found[setting] = compare(results, setting, reference, replicates)
        except KeyError as err:
            print(f"[report] {'/'.join(setting)}: skipped ({err.args[0]})", flush=True)
    return found


def write_report(root: Path, reference: str, replicates: int = REPLICATES, plots: bool = True) -> list[Path]:
    """results.csv, report.md and (``plots``) the plots of every finished run below ``root``."""
    results = load_results(root)
    comparisons = comparisons_of(results, reference, replicates)
    write_csv(results, root / "results.csv")
    page = report_markdown(root.name, results, comparisons, reference, replicates)
    (root / "report.md").write_text(page, encoding="utf-8")
    written = [root / "results.csv", root / "report.md"]
    return written + (write_plots(results, comparisons, root) if plots else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results directory (a grid's --out, or any folder of run dirs)")
    parser.add_argument("--reference", help="the method every difference is taken against "
                                            "(default: the grid's reference, else fedavg)")
    parser.add_argument("--replicates", type=int, default=REPLICATES, help="bootstrap replicates (default %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--doc", type=Path, help="a results document whose markers to render from the data")
    parser.add_argument("--check", action="store_true", help="with --doc: only check it; exit 1 on any mismatch")
    args = parser.parse_args(argv)
    root = args.results.resolve()
    if not root.is_dir():
        parser.error(f"{args.results} is not a directory")
    if args.check and not args.doc:
        parser.error("--check needs --doc FILE")
    reference = args.reference or grid_reference(root)
    if args.doc:
        evaluator = Evaluator(load_results(root), reference, args.replicates, grid_of(root))
        if args.check:
            problems = check_file(args.doc, evaluator)
            for problem in problems:
                print(problem, flush=True)
            print(f"[report] {args.doc}: {len(problems)} problem(s)", flush=True)
            return 1 if problems else 0
        try:
            render_file(args.doc, evaluator)
        except DocError as err:
            print(f"fedlora report: {args.doc}: {err}; nothing written", file=sys.stderr, flush=True)
            return 2
        print(f"[report] rendered {args.doc} from {root}", flush=True)
        return 0
    for path in write_report(root, reference, args.replicates, plots=not args.no_plots):
        print(f"[report] wrote {path}", flush=True)
    return 0
