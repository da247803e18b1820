"""The fedlora ServerApp: one ``@app.main()`` that runs a whole federated LoRA fine-tune.

Validates the config before anything loads, builds the initial adapter (LoRA A, B = 0 and a
classification head, all from the run seed: :mod:`fedlora.adapters.initial`), runs the
configured strategy with an evaluation after every round, and writes the run directory (see
:mod:`fedlora.server.rundir`): metrics first, then the checkpoint, after every round.

``evaluation.where`` says who evaluates: ``server`` — the server's own model on the held-out
split (round 0 = the initial adapter); ``clients`` — the ``fraction-evaluate`` clients on their
rows after every training round (``client_eval_*``, the run's headline metric), and the server
holds the adapter on a skeleton of the base without its weights; ``none`` — nobody, with the
same skeleton. The run directory and the final adapter are the same in every mode. A run with
a test split (``dataset.test-fraction``) has the server score the final model on it once, after
the last round (:mod:`fedlora.server.testset`).

With ``resume-from`` it continues a run from its last checkpoint instead. The ServerApp holds
the run directory's lock (:mod:`fedlora.server.lock`) from before it touches the directory
until it ends, so no second ServerApp can write there meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

from fedlora.adapters.lora import adapter_state
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.privacy.user_level import UserLevelDP
from fedlora.run_config import check_strategy, load_config
from fedlora.server.checkpoint import CHECKPOINT_FILE, Checkpoint, check_resumable, read_checkpoint
from fedlora.server.report import RoundReporter
from fedlora.server.rounds import RoundLoop
from fedlora.server.lock import run_directory_lock
from fedlora.server.rundir import RunDirectory, resolve_output_dir, resolve_path
from fedlora.server.strategy import ServerStrategy
from fedlora.server.testset import score_final_model
from fedlora.task import heldout_rows, load_task, server_model, skeleton_model

app = ServerApp()


def build_strategy(cfg: RunConfig, initial_state: AdapterState) -> ServerStrategy:
    """The registered server part of ``cfg.strategy``, wrapped in user-level DP when ``dp.mode = "user"``."""
    spec = check_strategy(cfg)
    strategy = spec.server_class()(cfg, initial_state)
    if cfg.dp.mode == "user":
        return UserLevelDP(strategy, cfg, spec.capabilities.setup_round)
    return strategy


def server_evaluation(cfg: RunConfig, strategy: ServerStrategy, model: PeftModel,
                      device: torch.device) -> Callable[[], dict[str, float]]:
    """What the round loop calls after every round: the global model on the held-out split
    (``evaluation.where = server``), else nothing (the clients evaluate, or nobody does)."""
    if cfg.evaluation.where != "server":
        return lambda: {}
    task, rows, amp = load_task(cfg), heldout_rows(cfg), autocast_dtype(cfg.precision, device)

    def evaluate() -> dict[str, float]:
        strategy.apply_to(model)
        return evaluate_rows(model, rows, task.kind, task.pad_id, 64, device, amp)

    return evaluate


def run_path(cfg: RunConfig) -> Path:
    """The run directory: ``resume-from``'s, else ``output-dir`` (default ``runs/<timestamp>-<strategy>``)."""
    return resolve_path(cfg.resume_from) if cfg.resume_from else resolve_output_dir(cfg)


def open_run(cfg: RunConfig, path: Path) -> tuple[RunDirectory, Checkpoint | None]:
    """A new run directory, or (``resume-from``) the resumed one with its verified checkpoint."""
    if not cfg.resume_from:
        return RunDirectory.create(cfg, path), None
    checkpoint_file = path / CHECKPOINT_FILE
    checkpoint = read_checkpoint(checkpoint_file)
    check_resumable(checkpoint, cfg, checkpoint_file)
    return RunDirectory.resume(cfg, checkpoint.server_round), checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated fine-tune (see the module docstring), holding its run directory's lock throughout."""
    cfg = load_config(context.run_config)
    path = run_path(cfg)
    with run_directory_lock(path, context.run_id):
        run(grid, cfg, path)


def run(grid: Grid, cfg: RunConfig, path: Path) -> None:
    """Open (or resume) the run directory ``path``, run every round, save the final adapter and the summary."""
    task = load_task(cfg)
    run_dir, resumed = open_run(cfg, path)
    print(f"[fedlora] run directory: {run_dir.path}", flush=True)
    device = pick_device(cfg.device)
    model = server_model(cfg, str(device)) if cfg.evaluation.where == "server" else skeleton_model(cfg)
    strategy = build_strategy(cfg, adapter_state(model))
    evaluate = server_evaluation(cfg, strategy, model, device)
    reporter = RoundReporter(run_dir, cfg, task.kind, run_dir.read_metrics() if resumed else None)
    loop = RoundLoop(strategy, cfg, evaluate, reporter, run_dir.checkpoint)
    if resumed:
        loop.restore(resumed.arrays, resumed.values)
        print(f"[fedlora] resuming after round {resumed.server_round} from {run_dir.checkpoint}", flush=True)
    loop.run(grid, first_round=resumed.server_round + 1 if resumed else 0)
    strategy.save_final(model, run_dir.final_adapter)
    summary = {**reporter.summary(), **score_final_model(cfg, strategy, model, run_dir.path, device)}
    run_dir.write_summary(summary)
    print(reporter.table(), flush=True)
    print(f"[fedlora] {summary['metric']}: {summary['initial']} (round 0) -> {summary['final']} "
          f"(round {cfg.num_server_rounds}); run directory: {run_dir.path}", flush=True)
