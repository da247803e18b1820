"""Run every cell of a grid as a fedlora run directory, reusing only what may be reused.

Study by study, first its lr-sweep cells, then its main cells; for each cell:

1. its config: the grid's, with a variant's rank resolved (:mod:`fedlora.experiments.variants`)
   and, for a main cell of a study with an lr sweep, the lr its sweep chose
   (:mod:`fedlora.experiments.lr_sweep`) — a main cell whose sweep is not complete *waits*;
2. its status (:mod:`fedlora.experiments.cells`): ``finished`` cells are skipped, ``stale`` ones
   (same config, other code) are rerun unless ``reuse_stale``, anything else runs;
3. ``cell.json`` records its coordinates, its lr choice and its variant's rank.

A failed cell is reported and the sweep goes on. Every line a run prints is prefixed with
``cell i/N (study: method, partition, privacy, seed)``. With several workers the cells of a phase
run in parallel processes, and a study's sweep still finishes before its main cells are configured.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from fedlora.experiments.baselines import run_baseline
from fedlora.experiments.cells import FINISHED, STALE, cell_status, expected_config, run_dir_of, write_cell_file
from fedlora.experiments.grid import Cell, Grid
from fedlora.experiments.lr_sweep import LrChoice, SweepScore, choose_lr
from fedlora.experiments.variants import resolve_variant
from fedlora.run_config import full_defaults, load_config
from fedlora.server.report import higher_is_better

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
    status: str  # "skipped", "reused stale", "done", "waiting: <why>" or "failed: <reason>"
    seconds: float


class Waiting(Exception):
    """A main cell cannot be configured yet: its lr sweep is incomplete."""


class Plan:
    """The configs of a grid's cells under ``out``: variant ranks and lr choices resolved, once each."""

    def __init__(self, grid: Grid, out: Path, reuse_stale: bool = False) -> None:
        self.grid = grid
        self.out = out
        self.reuse_stale = reuse_stale
        self._variants: dict[tuple[str, str], dict[str, Any]] = {}
        self._choices: dict[tuple[str, str, str], LrChoice] = {}

    def variant_keys(self, cell: Cell) -> dict[str, Any] | None:
        """The resolved LoRA keys of a variant cell's method (None for other methods)."""
        study = self.grid.study(cell.study)
        variant = study.variant(cell.method)
        if variant is None:
            return None
        key = (cell.study, cell.method)
        if key not in self._variants:
            base = {**self.grid.base, **study.base}
            self._variants[key] = resolve_variant(variant.strategy, variant.reference, base, self.grid.num_clients)
        return self._variants[key]

    def usable(self, cell: Cell, config: dict[str, Any]) -> bool:
        """Whether the cell's result may be used: finished, or stale and stale results were asked for."""
        status = cell_status(run_dir_of(self.out, cell), config)
        return status == FINISHED or (status == STALE and self.reuse_stale)

    def lr_choice(self, cell: Cell) -> tuple[LrChoice, str] | None:
        """The sweep's choice for a main cell and the sweep level it comes from; None when its study has no
        sweep. Raises :class:`Waiting` while a sweep cell it needs is not usable."""
        study = self.grid.study(cell.study)
        if study.lr_sweep is None or cell.is_sweep:
            return None
        level = study.lr_sweep.level_for(cell.privacy)
        key = (cell.study, cell.method, level)
        if key not in self._choices:
            scores: dict[float, list[SweepScore]] = {}
            higher = True
            for sweep_cell in study.sweep_cells():
                if (sweep_cell.method, sweep_cell.privacy) != (cell.method, level):
                    continue
                run_dir = run_dir_of(self.out, sweep_cell)
                if not self.usable(sweep_cell, self.config(sweep_cell)):
                    raise Waiting(f"its lr sweep needs {sweep_cell.label()}")
                summary = json.loads((run_dir / "summary.json").read_text())
                higher = higher_is_better(summary["metric"])
                scores.setdefault(float(sweep_cell.lr), []).append(SweepScore(summary.get("final"),
                                                                              summary.get("final_eval_loss")))
            self._choices[key] = choose_lr(scores, higher)
        return self._choices[key], level

    def overrides(self, cell: Cell) -> dict[str, Any]:
        """The run-config keys the cell runs with, ``output-dir`` included (raises :class:`Waiting` for a main
        cell whose sweep is incomplete)."""
        choice = self.lr_choice(cell)
        keys = self.grid.overrides(cell, choice[0].lr if choice else None, self.variant_keys(cell))
        return {**keys, "output-dir": str(run_dir_of(self.out, cell))}

    def config(self, cell: Cell) -> dict[str, Any]:
        """The flat config ``config.json`` must hold (raises :class:`Waiting` like :meth:`overrides`)."""
        return expected_config(cell, self.overrides(cell), self.grid.num_clients)

    def cell_record(self, cell: Cell) -> dict[str, Any]:
        """What ``cell.json`` adds to the coordinates: the lr choice and the variant's rank."""
        record: dict[str, Any] = {}
        choice = self.lr_choice(cell)
        if choice is not None:
            lr_choice, level = choice
            record["lr_choice"] = {"lr": lr_choice.lr, "level": level,
                                   "means": {f"{lr:g}": m for lr, m in lr_choice.means.items()}}
        variant = self.grid.study(cell.study).variant(cell.method)
        if variant is not None:
            record["variant"] = {"strategy": variant.strategy, "reference": variant.reference,
                                 **self.variant_keys(cell)}
        return record


@dataclass(frozen=True)
class Job:
    """One cell to run, with everything a worker process needs."""

    grid: Grid
    cell: Cell
    run_dir: Path
    overrides: dict[str, Any]
    config: dict[str, Any]
    record: dict[str, Any]
    launcher: str
    prefix: str


def run_cell(job: Job) -> None:
    """Run one cell to completion in its run directory, with its overrides."""
    grid, cell, overrides = job.grid, job.cell, job.overrides
    if cell.is_baseline:
        run_baseline(cell.method, load_config({**full_defaults(), **overrides}), grid.num_clients, job.run_dir,
                     job.config)
    elif job.launcher == "flwr":
        from fedlora.runtime.launch import run_simulation

        result = run_simulation(overrides, num_supernodes=grid.num_clients)
        if not result.ok:
            raise RuntimeError(f"flwr run ended with status {result.status!r}")
    else:
        from fedlora.runtime.inprocess import run_inprocess

        run_inprocess(overrides, num_nodes=grid.num_clients)


def cell_states(plan: Plan) -> list[tuple[Cell, str]]:
    """Every cell of the grid with its status now: finished, stale, missing, or ``waiting: <why>``."""
    states = []
    for cell in plan.grid.cells():
        try:
            states.append((cell, cell_status(run_dir_of(plan.out, cell), plan.config(cell))))
        except Waiting as why:
            states.append((cell, f"waiting: {why}"))
    return states


def execute(job: Job) -> CellOutcome:
    """Run one cell; a failure is reported in the outcome (one broken cell must not lose a long sweep)."""
    started = time.monotonic()
    print(f"{job.prefix}starting", flush=True)
    try:
        with contextlib.redirect_stdout(PrefixWriter(sys.stdout, job.prefix)):
            run_cell(job)
        if cell_status(job.run_dir, job.config) != FINISHED:
            raise RuntimeError(f"{job.run_dir} holds no finished run of this config and code after the run")
        write_cell_file(job.run_dir, job.cell, job.record)
        status = "done"
    except Exception as err:  # noqa: BLE001 — reported, and the sweep goes on
        traceback.print_exc()
        status = f"failed: {type(err).__name__}: {err}"
    seconds = time.monotonic() - started
    print(f"{job.prefix}{status} in {seconds:.0f} s", flush=True)
    return CellOutcome(job.cell, status, seconds)


def prepare(plan: Plan, cell: Cell, prefix: str, launcher: str) -> CellOutcome | Job:
    """The cell's outcome when it needs no run (skipped, reused, waiting), else the job that runs it."""
    run_dir = run_dir_of(plan.out, cell)
    try:
        overrides = plan.overrides(cell)
    except Waiting as why:
        print(f"{prefix}waiting: {why}", flush=True)
        return CellOutcome(cell, f"waiting: {why}", 0.0)
    config = expected_config(cell, overrides, plan.grid.num_clients)
    status = cell_status(run_dir, config)
    if status == FINISHED or (status == STALE and plan.reuse_stale):
        said = "skipped: finished with the same config and code" if status == FINISHED else \
            "reused: same config, other code version (stale, marked in every table)"
        print(prefix + said, flush=True)
        write_cell_file(run_dir, cell, plan.cell_record(cell))
        return CellOutcome(cell, "skipped" if status == FINISHED else "reused stale", 0.0)
    print(prefix + ("queued (its result is stale: other code version)" if status == STALE else "queued"), flush=True)
    return Job(plan.grid, cell, run_dir, overrides, config, plan.cell_record(cell), launcher, prefix)


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_sweep(plan: Plan, launcher: str = "inprocess", workers: int = 1) -> list[CellOutcome]:
    """Run (or skip) every cell, study by study: its lr-sweep cells, then its main cells (configured only once
    the sweep is done). ``workers`` > 1 runs that many cells at a time in worker processes, each with its share
    of the CPU threads."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not one of {LAUNCHERS}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = len(plan.grid.cells())
    phases = [phase for study in plan.grid.studies for phase in (study.sweep_cells(), study.main_cells())]
    outcomes: list[CellOutcome] = []
    pool = None if workers == 1 else ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_limit_threads,
        initargs=(max(1, (os.cpu_count() or workers) // workers),))
    try:
        for phase in phases:
            first = len(outcomes) + 1
            prepared = [prepare(plan, cell, f"cell {first + i}/{total} {cell.label()} ", launcher)
                        for i, cell in enumerate(phase)]
            jobs = [p for p in prepared if isinstance(p, Job)]
            done = iter(pool.map(execute, jobs) if pool else map(execute, jobs))
            outcomes += [next(done) if isinstance(p, Job) else p for p in prepared]
    finally:
        if pool:
            pool.shutdown()
    return outcomes
