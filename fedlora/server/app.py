"""The fedlora ServerApp: one ``@app.main()`` that runs a whole federated LoRA fine-tune.

Validates the config before anything loads, builds the initial adapter (LoRA A from the
run seed, B = 0, classification head from a fixed seed), runs the configured strategy
with a held-out evaluation after every round (round 0 = the base model), and writes the
run directory (see :mod:`fedlora.server.rundir`): metrics first, then the checkpoint, after
every round. With ``resume-from`` it continues a run from its last checkpoint instead.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters.lora import adapter_state
from fedlora.config import RunConfig, parse_config
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.server.checkpoint import CHECKPOINT_FILE, Checkpoint, check_resumable, read_checkpoint, write_checkpoint
from fedlora.server.report import RoundReporter
from fedlora.server.rundir import RunDirectory, resolve_path
from fedlora.strategies import build_strategy
from fedlora.task import heldout_rows, load_task, server_model

app = ServerApp()


def open_run(cfg: RunConfig) -> tuple[RunDirectory, Checkpoint | None]:
    """A new run directory, or (``resume-from``) the resumed one with its verified checkpoint."""
    if not cfg.resume_from:
        return RunDirectory.create(cfg), None
    path = resolve_path(cfg.resume_from) / CHECKPOINT_FILE
    checkpoint = read_checkpoint(path)
    check_resumable(checkpoint, cfg, path)
    return RunDirectory.resume(cfg, checkpoint.server_round), checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    task = load_task(cfg)
    run_dir, resumed = open_run(cfg)
    print(f"[fedlora] run directory: {run_dir.path}", flush=True)
    device = pick_device(cfg.device)
    model = server_model(cfg, str(device))
    rows = heldout_rows(cfg)
    amp = autocast_dtype(cfg.precision, device)

    strategy = build_strategy(cfg, adapter_state(model))

    def evaluate() -> dict[str, float]:
        strategy.apply_to(model)
        return evaluate_rows(model, rows, task.kind, task.pad_id, 64, device, amp)

    if resumed:
        strategy.restore_state(resumed.arrays, resumed.values)
        print(f"[fedlora] resuming after round {resumed.server_round} from {run_dir.checkpoint}", flush=True)
    reporter = RoundReporter(run_dir, cfg, task.kind, run_dir.read_metrics() if resumed else None)

    def on_round(server_round: int, metrics: dict) -> None:
        reporter.on_round(server_round, metrics)
        write_checkpoint(run_dir.checkpoint, Checkpoint(server_round, cfg.to_flat(), *strategy.checkpoint_state()))

    strategy.run(grid, evaluate, on_round, first_round=resumed.server_round + 1 if resumed else 0)
    strategy.save_final(model, run_dir.final_adapter)
    summary = reporter.summary()
    run_dir.write_summary(summary)
    print(reporter.table(), flush=True)
    print(f"[fedlora] {summary['metric']}: {summary['initial']} (round 0) -> {summary['final']} "
          f"(round {cfg.num_server_rounds}); run directory: {run_dir.path}", flush=True)
