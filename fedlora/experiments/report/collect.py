"""Read any results directory back: every finished run directory under it, with its coordinates and test results.

A run directory is any folder below the results directory that holds ``summary.json`` and
``config.json``. Its coordinates (study, method, partition, privacy, seed, role) come from
``cell.json`` when the grid runner wrote one, else from its config: method = the baseline or
the strategy, partition = ``partition.kind`` (``dirichlet-<alpha>``; ``pooled`` for
centralized), privacy = ``none`` or ``eps-<target ε>``, study = the folder under ``runs/``
(none for a flat layout), role = ``sweep`` below an ``lr-sweep`` folder, else ``baseline`` or
``main``. A result is *stale* when the code version in its summary is not the running code's.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.experiments.cells import CELL_FILE
from fedlora.experiments.grid import BASELINES, NONE, POOLED
from fedlora.server.rundir import RUNNING_CODE_VERSION
from fedlora.server.testset import TEST_FILE

COLUMNS = ["study", "method", "partition", "privacy", "seed", "role", "strategy", "lr", "rank", "metric", "initial",
           "final", "final_eval_loss", "test_accuracy", "test_perplexity", "test_loss", "test_examples",
           "bytes_up", "bytes_down", "setup_epsilon", "final_epsilon", "wall_seconds", "code_version", "stale"]


@dataclass(frozen=True)
class TestResults:
    """A run's ``test_predictions.npz`` (see :mod:`fedlora.server.testset`)."""

    correct: np.ndarray
    loss: np.ndarray
    tokens: np.ndarray
    label: np.ndarray
    fingerprint: str
    majority_label: int

    @classmethod
    def load(cls, path: Path) -> "TestResults":
        with np.load(path, allow_pickle=False) as data:
            return cls(correct=data["correct"].astype(np.float64), loss=data["loss"].astype(np.float64),
                       tokens=data["tokens"].astype(np.float64), label=data["label"], fingerprint=str(data["fingerprint"]),
                       majority_label=int(data["majority_label"]))


@dataclass
class CellResult:
    """One finished run directory: where it sits in a grid, its config, summary, rounds and test results."""

    run_dir: Path
    study: str
    method: str
    partition: str
    privacy: str
    seed: int
    role: str
    config: dict[str, Any]
    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(repr=False)
    cell: dict[str, Any] = field(default_factory=dict)

    @property
    def stale(self) -> bool:
        return self.summary.get("code_version") != RUNNING_CODE_VERSION

    @property
    def setting(self) -> tuple[str, str, str]:
        return self.study, self.partition, self.privacy

    @property
    def task(self) -> str:
        return "classification" if str(self.summary.get("metric", "")).endswith("accuracy") else "instruction"

    @cached_property
    def test(self) -> TestResults | None:
        path = self.run_dir / TEST_FILE
        return TestResults.load(path) if path.is_file() else None

    def training_rounds(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if r.get("round", 0) >= 1]

    def bytes_per_round(self, direction: str) -> float:
        """Mean bytes per training round, all clients together (round 0, a setup phase, excluded)."""
        rounds = self.training_rounds()
        return sum(float(r.get(f"bytes_{direction}", 0)) for r in rounds) / max(len(rounds), 1)

    def setup_bytes(self) -> float:
        """Bytes of round 0 (a setup phase such as Fed-SB's gradient round), both directions."""
        first = next((r for r in self.rounds if r.get("round") == 0), {})
        return float(first.get("bytes_up", 0)) + float(first.get("bytes_down", 0))

    def setup_epsilon(self) -> float | None:
        """ε spent before training (round 0's ``epsilon_max``: 0 for a private run without a setup phase); None
        without DP."""
        if self.config.get("dp.mode", NONE) == NONE:
            return None
        first = next((r for r in self.rounds if r.get("round") == 0), {})
        return first.get("epsilon_max", 0.0)

    def row(self) -> dict[str, Any]:
        """The cell's ``results.csv`` row."""
        s = self.summary
        return {"study": self.study, "method": self.method, "partition": self.partition, "privacy": self.privacy,
                "seed": self.seed, "role": self.role, "strategy": self.config.get("strategy"),
                "lr": self.config.get("lr"), "rank": self.config.get("lora.rank"), "metric": s.get("metric"),
                "initial": s.get("initial"), "final": s.get("final"), "final_eval_loss": s.get("final_eval_loss"),
                "test_accuracy": s.get("test_accuracy"), "test_perplexity": s.get("test_perplexity"),
                "test_loss": s.get("test_loss"), "test_examples": s.get("test_examples"),
                "bytes_up": int(s.get("total_bytes_up") or 0), "bytes_down": int(s.get("total_bytes_down") or 0),
                "setup_epsilon": self.setup_epsilon(), "final_epsilon": s.get("final_epsilon"),
                "wall_seconds": round(float(s.get("wall_seconds") or 0.0), 1), "code_version": s.get("code_version"),
                "stale": self.stale}


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def partition_name(config: dict[str, Any]) -> str:
    """The grid's partition name of a run config (``pooled`` for a centralized baseline)."""
    if config.get("baseline") == "centralized":
        return POOLED
    kind = config.get("partition.kind", "iid")
    return f"dirichlet-{config.get('partition.alpha'):g}" if kind == "dirichlet" else kind


def privacy_name(config: dict[str, Any]) -> str:
    """The grid's privacy name of a run config: ``none``, ``eps-<ε>``, or ``<mode>-z<σ>`` without a budget."""
    mode = config.get("dp.mode", NONE)
    if mode == NONE:
        return NONE
    epsilon = float(config.get("dp.target-epsilon") or 0)
    if mode == "sample" and epsilon > 0:
        return f"eps-{epsilon:g}"
    return f"{mode}-{'eps' if epsilon > 0 else 'z'}{epsilon if epsilon > 0 else config.get('dp.noise-multiplier'):g}"


def load_cell(run_dir: Path, root: Path) -> CellResult:
    """The result in ``run_dir`` (a run directory below the results directory ``root``)."""
    config, summary = _read(run_dir / "config.json"), _read(run_dir / "summary.json")
    metrics = run_dir / "metrics.jsonl"
    rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    cell = _read(run_dir / CELL_FILE) if (run_dir / CELL_FILE).is_file() else {}
    parts = run_dir.relative_to(root).parts
    inner = parts[1:-1] if parts and parts[0] == "runs" else parts[:-1]
    method = str(config.get("baseline") or config.get("strategy"))
    derived = {
        "study": next((p for p in inner if p != "lr-sweep"), ""), "method": method,
        "partition": partition_name(config), "privacy": privacy_name(config), "seed": int(config.get("seed", 0)),
        "role": "sweep" if "lr-sweep" in inner else "baseline" if method in BASELINES else "main",
    }
    coordinates = {k: cell.get(k, v) for k, v in derived.items()}
    return CellResult(run_dir=run_dir, config=config, summary=summary, rounds=rounds, cell=cell, **coordinates)


def load_results(root: Path) -> list[CellResult]:
    """Every finished run directory below ``root``, in path order."""
    return [load_cell(summary.parent, root) for summary in sorted(Path(root).rglob("summary.json"))
            if (summary.parent / "config.json").is_file()]


def write_csv(results: list[CellResult], path: Path) -> None:
    """``results.csv``: one row per run directory."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow({k: ("" if v is None else v) for k, v in result.row().items()})
