"""Where a cell lives, the config it must hold, and whether its result may be used.

Cell ``c`` of a grid whose output is ``<out>`` lives in
``<out>/runs/[<study>/][lr-sweep/]<method>__<partition>__<privacy>__s<seed>[__lr<lr>]/`` (no study
folder for a single-study grid of the older form). Besides the fedlora run directory
(``config.json``, ``metrics.jsonl``, ``summary.json``, ``test_predictions.npz``) it holds
``cell.json``: the cell's coordinates in the grid and, for a main cell, how its lr was chosen.

A cell's status:

* ``finished`` — ``summary.json`` exists and belongs to the run in ``metrics.jsonl`` (its round
  count and final metric are that file's last round: a summary left by an earlier run of the
  directory, as code before the run directory cleared it could leave, does not count),
  ``config.json`` equals the config the grid asks for now, and the summary's ``code_version``
  is the running code's (:data:`fedlora.server.rundir.RUNNING_CODE_VERSION`);
* ``stale`` — the same, but produced by other code (or by code that recorded no version): it is
  rerun, unless the user asks to reuse stale cells, and then every table marks it;
* ``missing`` — anything else (never run, interrupted, or another config): it is (re)run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedlora.experiments.grid import Cell
from fedlora.run_config import full_defaults, load_config
from fedlora.server.rundir import RUNNING_CODE_VERSION, SUMMARY_FILE, TEST_FILE

CELL_FILE = "cell.json"
FINISHED, STALE, MISSING = "finished", "stale", "missing"


def run_dir_of(out: Path, cell: Cell) -> Path:
    """The run directory of ``cell`` under the grid output ``out``."""
    folder = out / "runs"
    if cell.study:
        folder = folder / cell.study
    if cell.is_sweep:
        folder = folder / "lr-sweep"
    return folder / cell.name


def centralized_batch_size(batch_size: int, num_clients: int) -> int:
    """Centralized batch: as many examples per step as all clients together take per local step."""
    return batch_size * num_clients


def expected_config(cell: Cell, overrides: dict[str, Any], num_clients: int) -> dict[str, Any]:
    """The flat config ``config.json`` must hold for this cell, run with ``overrides`` (its grid overrides and
    ``output-dir``) among ``num_clients`` clients; baselines add their own keys."""
    flat = load_config({**full_defaults(), **overrides}).to_flat()
    if cell.is_baseline:
        flat["baseline"] = cell.method
        flat["num-clients"] = num_clients
    if cell.method == "centralized":
        flat["centralized-batch-size"] = centralized_batch_size(flat["batch-size"], num_clients)
    return json.loads(json.dumps(flat))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summary_of_its_run(run_dir: Path) -> dict[str, Any] | None:
    """``summary.json`` when it summarises the run recorded in ``metrics.jsonl`` (same round count and final
    metric as that file's last round), else None."""
    summary = _read_json(run_dir / SUMMARY_FILE)
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or last.get("round") != summary.get("rounds"):
        return None
    return summary if last.get(summary.get("metric")) == summary.get("final") else None


def drop_unmatched_summaries(root: Path) -> list[Path]:
    """Remove every ``summary.json`` (and test predictions) below ``root`` that is not the summary of the run in
    its directory's ``metrics.jsonl`` (:func:`summary_of_its_run`); the run directories it came from, sorted.

    For results written by code that did not clear an earlier result when a cell reran (a suite finished with
    its own older code): after that run is interrupted, this makes the grid rerun the cell instead of
    taking the earlier result as its own. ``python -m fedlora.experiments.cells DIR`` runs it.
    """
    dropped = []
    for summary in sorted(Path(root).rglob(SUMMARY_FILE)):
        if summary_of_its_run(summary.parent) is None:
            for name in (SUMMARY_FILE, TEST_FILE):
                (summary.parent / name).unlink(missing_ok=True)
            dropped.append(summary.parent)
    return dropped


def cell_status(run_dir: Path, config: dict[str, Any]) -> str:
    """``finished``, ``stale`` or ``missing`` (see the module docstring)."""
    summary = summary_of_its_run(run_dir)
    if summary is None or _read_json(run_dir / "config.json") != config:
        return MISSING
    return FINISHED if summary.get("code_version") == RUNNING_CODE_VERSION else STALE


def write_cell_file(run_dir: Path, cell: Cell, extra: dict[str, Any]) -> None:
    """``cell.json``: the cell's coordinates, its role and ``extra`` (the lr choice, the variant's rank)."""
    role = "sweep" if cell.is_sweep else "baseline" if cell.is_baseline else "main"
    record = {"study": cell.study, "method": cell.method, "partition": cell.partition, "privacy": cell.privacy,
              "seed": cell.seed, "lr": cell.lr, "role": role, **extra}
    (run_dir / CELL_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m fedlora.experiments.cells DIR``: :func:`drop_unmatched_summaries` below DIR, one line per cell."""
    parser = argparse.ArgumentParser(prog="python -m fedlora.experiments.cells",
                                     description=drop_unmatched_summaries.__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results directory (a grid's --out)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"{args.results} is not a directory")
    for folder in drop_unmatched_summaries(args.results):
        print(f"dropped an earlier run's result in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
