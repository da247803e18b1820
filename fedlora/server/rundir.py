"""The run directory contract that experiments and users rely on.

    <output-dir>/config.json      the full resolved config (flat dotted keys)
    <output-dir>/metrics.jsonl    one JSON object per round (round 0 = before training)
    <output-dir>/summary.json     final metrics, best round, totals, wall time
    <output-dir>/final_adapter/   loadable with peft.PeftModel.from_pretrained(base, path)

A relative ``output-dir`` resolves against the project directory: ``$FEDLORA_PROJECT_DIR``
when set (``make run`` sets it), else the directory the ServerApp process runs in.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig

PROJECT_DIR_ENV = "FEDLORA_PROJECT_DIR"


def resolve_output_dir(cfg: RunConfig, now: float | None = None) -> Path:
    """``output-dir`` or ``runs/<timestamp>-<strategy>``, absolute."""
    raw = cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{cfg.strategy}"
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
    def create(cls, cfg: RunConfig) -> "RunDirectory":
        path = resolve_output_dir(cfg)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2, sort_keys=True) + "\n")
        metrics = path / "metrics.jsonl"
        if metrics.exists():
            metrics.unlink()
        return cls(path)

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
        tmp = self.path / "summary.json.tmp"
        tmp.write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")
        tmp.replace(self.path / "summary.json")
