"""The run directory contract that experiments and users rely on.

    <output-dir>/config.json      the full resolved config (flat dotted keys)
    <output-dir>/metrics.jsonl    one JSON object per round (round 0 = before training)
    <output-dir>/summary.json     final metrics, best round, totals, wall time, and the code version
                                  (:func:`code_version`) and library versions of the process that wrote it
    <output-dir>/final_adapter/   loadable with peft.PeftModel.from_pretrained(base, path)
    <output-dir>/checkpoint.safetensors   the server state after the last complete round
                                  (see fedlora.server.checkpoint; ``resume-from`` continues from it)
    <output-dir>/test_predictions.npz     with a test split: every test example's prediction (fedlora.server.testset)

A new run in a directory that holds an earlier run's files starts by removing that run's
results (summary.json, test_predictions.npz), so a run that does not finish never leaves an
earlier run's result beside its own config.

A relative ``output-dir`` resolves against the project directory: ``$FEDLORA_PROJECT_DIR``
when set (``make run`` sets it), else the directory the ServerApp process runs in.

The code version keys experiment cells (:mod:`fedlora.experiments.cells`): a result is reused
only by the code that produced it. It is taken when the process imports this module; a run
resumed with ``resume-from`` records the version of the process that finished it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from importlib.metadata import PackageNotFoundError, version
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.atomic_write import write_atomic
from fedlora.config import ConfigError, RunConfig
from fedlora.server.checkpoint import CHECKPOINT_FILE, CheckpointError

PROJECT_DIR_ENV = "FEDLORA_PROJECT_DIR"
SUMMARY_FILE = "summary.json"
TEST_FILE = "test_predictions.npz"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
#: folders of the package that only analyse results (they never change one): left out of the code version
ANALYSIS_ONLY = ("experiments/report",)
#: libraries whose versions every summary records beside the code version
LIBRARIES = ("torch", "transformers", "peft", "opacus", "flwr", "numpy")


def code_version(root: Path = PACKAGE_ROOT) -> str:
    """A fingerprint of the fedlora sources under ``root``: the first 16 hex digits of the SHA-256 over every
    ``*.py`` file's relative path and bytes, in path order, except the :data:`ANALYSIS_ONLY` folders."""
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root).as_posix()
        if any(relative.startswith(folder + "/") for folder in ANALYSIS_ONLY):
            continue
        digest.update(relative.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


#: the code version of this process, taken when it first imports this module (before it can run anything)
RUNNING_CODE_VERSION = code_version()


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (``"absent"`` for one that is not installed)."""
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"
    return {name: installed(name) for name in LIBRARIES}


def resolve_output_dir(cfg: RunConfig, now: float | None = None) -> Path:
    """``output-dir`` or ``runs/<timestamp>-<strategy>``, absolute."""
    return resolve_path(cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{cfg.strategy}")


def resolve_path(raw: str) -> Path:
    """A user-given run path, absolute: relative paths resolve against the project directory."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get(PROJECT_DIR_ENV) or Path.cwd()) / path
    return path.resolve()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class RunDirectory:
    path: Path

    @classmethod
    def create(cls, cfg: RunConfig, path: Path) -> "RunDirectory":
        """A new run in ``path`` (from :func:`resolve_output_dir`): an earlier run's results removed, config.json
        written, metrics.jsonl empty."""
        path.mkdir(parents=True, exist_ok=True)
        for earlier in (SUMMARY_FILE, TEST_FILE, "metrics.jsonl"):
            (path / earlier).unlink(missing_ok=True)
        (path / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2, sort_keys=True) + "\n")
        return cls(path)

    @classmethod
    def resume(cls, cfg: RunConfig, last_round: int) -> "RunDirectory":
        """Continue the run directory ``resume-from`` after ``last_round``.

        Rewrites config.json with the resumed config and cuts metrics.jsonl back to rounds
        0..``last_round`` (dropping rounds recorded after the checkpoint and any partial
        line), so every round appears exactly once when the resumed run has finished.
        """
        path = resolve_path(cfg.resume_from)
        if cfg.output_dir and resolve_path(cfg.output_dir) != path:
            raise ConfigError(f"config keys 'output-dir' = {cfg.output_dir!r} and 'resume-from' = {cfg.resume_from!r} "
                              "name different run directories; a resumed run continues in its own")
        run_dir = cls(path)
        kept = run_dir._metrics_through(last_round)
        (path / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2, sort_keys=True) + "\n")
        write_atomic(path / "metrics.jsonl", "".join(line + "\n" for line in kept).encode("utf-8"))
        return run_dir

    def _metrics_through(self, last_round: int) -> list[str]:
        """The lines of rounds 0..``last_round`` of metrics.jsonl; a gap or a missing file is an error."""
        file = self.path / "metrics.jsonl"
        lines = file.read_text(encoding="utf-8").splitlines() if file.is_file() else []
        kept: list[str] = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record.get("round") != len(kept) or len(kept) > last_round:
                break
            kept.append(line)
        if len(kept) != last_round + 1:
            raise CheckpointError(f"{file} holds rounds 0..{len(kept) - 1} in order, but its checkpoint is at round "
                              f"{last_round}; it cannot be resumed")
        return kept

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def final_adapter(self) -> Path:
        return self.path / "final_adapter"

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        lines = (self.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json atomically, stamped with this process's code version and library versions."""
        stamped = {**summary, "code_version": RUNNING_CODE_VERSION, "libraries": library_versions()}
        tmp = self.path / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps({k: _jsonable(v) for k, v in stamped.items()}, indent=2) + "\n")
        tmp.replace(self.path / SUMMARY_FILE)
