"""The fedlora ServerApp: one ``@app.main()`` that runs a whole federated LoRA fine-tune.

Validates the config before anything loads, builds the initial adapter (LoRA A from the
run seed, B = 0, classification head from a fixed seed), runs the configured strategy
with a held-out evaluation after every round (round 0 = the base model), and writes the
run directory (see :mod:`fedlora.server.rundir`).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters.lora import adapter_state
from fedlora.config import parse_config
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.server.report import RoundReporter
from fedlora.server.rundir import RunDirectory
from fedlora.strategies import build_strategy
from fedlora.task import heldout_rows, load_task, server_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    task = load_task(cfg)
    run_dir = RunDirectory.create(cfg)
    print(f"[fedlora] run directory: {run_dir.path}", flush=True)
    device = pick_device(cfg.device)
    model = server_model(cfg, str(device))
    rows = heldout_rows(cfg)
    amp = autocast_dtype(cfg.precision, device)

    strategy = build_strategy(cfg, adapter_state(model))

    def evaluate() -> dict[str, float]:
        strategy.apply_to(model)
        return evaluate_rows(model, rows, task.kind, task.pad_id, 64, device, amp)

    reporter = RoundReporter(run_dir, cfg, task.kind)
    strategy.run(grid, evaluate, reporter.on_round)
    strategy.save_final(model, run_dir.final_adapter)
    summary = reporter.summary()
    run_dir.write_summary(summary)
    print(reporter.table(), flush=True)
    print(f"[fedlora] {summary['metric']}: {summary['initial']} (round 0) -> {summary['final']} "
          f"(round {cfg.num_server_rounds}); run directory: {run_dir.path}", flush=True)
