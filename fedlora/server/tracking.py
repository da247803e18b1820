"""Experiment tracking beside metrics.jsonl: TensorBoard and Weights & Biases, as ``report-to`` names them.

``report-to`` is Hugging Face's ``TrainingArguments.report_to`` for a federated run:
``none`` (default), or ``tensorboard`` and/or ``wandb`` separated by commas. Every round's
numeric metrics are logged at step = round (round 0 = the model before training):

* ``tensorboard``: event files in ``<run dir>/tensorboard/`` (``tensorboard --logdir runs``),
  the run config as text;
* ``wandb``: one W&B run named after the run directory, its files under ``<run dir>/wandb/``,
  the run config as the W&B config. Project and entity come from ``WANDB_PROJECT`` (default
  ``fedlora``) and ``WANDB_ENTITY``; ``WANDB_MODE=offline`` logs without an account
  (``wandb sync`` uploads later). A resumed run continues the same W&B run.

The packages are optional (``pip install 'fedlora[tracking]'``); :func:`check_report_to` is the
launcher's pre-flight check that they are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from fedlora.config import ConfigError, RunConfig

#: ``report-to`` target -> the Python package it needs
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_ID_FILE = "wandb-run-id"


class Tracker(Protocol):
    """Where a run's per-round metrics also go."""

    def log(self, server_round: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def report_targets(report_to: str) -> list[str]:
    """The trackers ``report-to`` names (``none`` = no tracker)."""
    return [t for t in (x.strip() for x in report_to.split(",")) if t and t != "none"]


def check_report_to(report_to: str) -> None:
    """Every tracker ``report-to`` names has its package installed; else a ConfigError saying what to install."""
    for target in report_targets(report_to):
        if importlib.util.find_spec(PACKAGES[target]) is None:
            raise ConfigError(f"config key 'report-to' = {report_to!r} needs the {PACKAGES[target]!r} package: "
                              f"pip install 'fedlora[tracking]' (or pip install {PACKAGES[target]})")


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a round's record (lists of reasons, names and missing values left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}


class TensorBoardTracker:
    """Scalars per round in ``<run dir>/tensorboard/``."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(cfg.to_flat(), indent=1) + "\n```")

    def log(self, server_round: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=server_round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per run directory (its id kept in the directory, so a resumed run continues it)."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        if not id_file.is_file():
            id_file.write_text(secrets.token_hex(8))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedlora"), name=run_dir.name, dir=str(run_dir),
                              id=id_file.read_text().strip(), resume="allow", config=cfg.to_flat(),
                              reinit="create_new", settings=wandb.Settings(quiet=True))

    def log(self, server_round: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=server_round)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def open_trackers(run_dir: Path, cfg: RunConfig) -> list[Tracker]:
    """The trackers ``cfg.report_to`` names, opened on ``run_dir``."""
    return [TRACKERS[target](run_dir, cfg) for target in report_targets(cfg.report_to)]
