"""Run every cell of a grid as a fedlora run directory, skipping cells that already finished.

Cell ``c`` of grid output ``<out>`` lives in ``<out>/runs/<strategy>__<partition>__<privacy>__s<seed>/``.
A cell is finished when its ``summary.json`` exists and its ``config.json`` equals the config
the grid asks for now, so an interrupted sweep resumes where it stopped and a changed grid
reruns exactly the cells whose config changed. Every line a run prints is prefixed with
``cell i/N (strategy, partition, privacy, seed)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from experiments.baselines import centralized_batch_size, run_baseline
from experiments.grid import Cell, Grid
from fedlora.run_config import full_defaults, load_config

LAUNCHERS = ("inprocess", "flwr")


class PrefixWriter(io.TextIOBase):
    """A text stream that prefixes every line written to ``target`` with ``prefix``."""

    def __init__(self, target: TextIO, prefix: str) -> None:
        super().__init__()
        self.target = target
        self.prefix = prefix
        self.at_line_start = True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.target.write(self.prefix)
            self.target.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # "skipped", "done" or "failed: <reason>"
    seconds: float


def run_dir_of(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.name


def expected_config(grid: Grid, cell: Cell, run_dir: Path) -> dict[str, Any]:
    """The flat config ``config.json`` must hold for this cell (baselines add their own keys)."""
    flat = load_config({**full_defaults(), **grid.overrides(cell), "output-dir": str(run_dir)}).to_flat()
    if cell.is_baseline:
        flat["baseline"] = cell.strategy
        flat["num-clients"] = grid.num_clients
    if cell.strategy == "centralized":
        flat["centralized-batch-size"] = centralized_batch_size(flat["batch-size"], grid.num_clients)
    return json.loads(json.dumps(flat))


def is_finished(run_dir: Path, config: dict[str, Any]) -> bool:
    """True when the run directory holds a summary and was produced by exactly ``config``."""
    try:
        return (run_dir / "summary.json").exists() and json.loads((run_dir / "config.json").read_text()) == config
    except (OSError, json.JSONDecodeError):
        return False


def run_cell(grid: Grid, cell: Cell, run_dir: Path, config: dict[str, Any], launcher: str) -> None:
    """Run one cell to completion; raise when it did not produce a finished run directory."""
    overrides = {**grid.overrides(cell), "output-dir": str(run_dir)}
    if cell.is_baseline:
        run_baseline(cell.strategy, load_config({**full_defaults(), **overrides}), grid.num_clients,
                     run_dir, config)
    elif launcher == "flwr":
        from fedlora.runtime.launch import run_simulation

        result = run_simulation(overrides, num_supernodes=grid.num_clients)
        if not result.ok:
            raise RuntimeError(f"flwr run ended with status {result.status!r}")
    else:
        from fedlora.runtime.inprocess import run_inprocess

        run_inprocess(overrides, num_nodes=grid.num_clients)
    if not is_finished(run_dir, config):
        raise RuntimeError(f"{run_dir} has no summary.json for this config after the run")


def run_sweep(grid: Grid, out: Path, launcher: str = "inprocess") -> list[CellOutcome]:
    """Run (or skip) every cell in order; a failed cell is reported and the sweep goes on."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not one of {LAUNCHERS}")
    cells = grid.cells()
    outcomes = []
    for index, cell in enumerate(cells, start=1):
        prefix = f"cell {index}/{len(cells)} {cell.label()} "
        run_dir = run_dir_of(out, cell)
        config = expected_config(grid, cell, run_dir)
        started = time.monotonic()
        if is_finished(run_dir, config):
            print(prefix + "skipped: finished with the same config", flush=True)
            outcomes.append(CellOutcome(cell, "skipped", 0.0))
            continue
        print(prefix + "starting", flush=True)
        try:
            with contextlib.redirect_stdout(PrefixWriter(sys.stdout, prefix)):
                run_cell(grid, cell, run_dir, config, launcher)
            status = "done"
        except Exception as err:  # one broken cell must not lose the rest of a long sweep
            traceback.print_exc()
            status = f"failed: {type(err).__name__}: {err}"
        seconds = time.monotonic() - started
        print(f"{prefix}{status} in {seconds:.0f} s", flush=True)
        outcomes.append(CellOutcome(cell, status, seconds))
    return outcomes
