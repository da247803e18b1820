"""Reference points for a study, written in the fedlora run-directory format.

* ``centralized`` (upper bound): one LoRA model trained on the union of all clients'
  partitions for ``num-server-rounds × local-steps`` steps — the steps each client takes in a
  federated run — of batch ``batch-size × num-clients``, so it sees as many training examples
  as the whole federation; evaluated on the validation split every ``local-steps`` steps.
* ``local-only`` (lower bound): every client trains its own LoRA model on its own partition
  only, for the same ``num-server-rounds × local-steps`` steps; each is evaluated on the
  validation split every ``local-steps`` steps, and each round's record is the mean over clients.

Both start from exactly the adapter a federated run starts from (``server_model``: LoRA A
and the head from the run seed, B = 0), train with the run's optimizer, batch size and
learning rate (one optimizer over the whole run), use the same training loop and evaluation
as fedlora's clients and server, communicate nothing (0 bytes) and are non-private. With a
test split, the final model is scored on it once (local-only: the mean over the clients'
models, example by example), as a federated run's is (:mod:`fedlora.server.testset`). The
majority-class baseline needs no run: the report takes it from ``test_predictions.npz``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import mean
from typing import Any, Callable

import torch

from fedlora.adapters.lora import set_trainable
from fedlora.client.loop import make_optimizer, train_steps
from fedlora.config import RunConfig
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.experiments.cells import centralized_batch_size
from fedlora.server.report import headline_metric
from fedlora.server.rundir import RunDirectory
from fedlora.server.testset import ExampleOutputs, outputs_on_test_split, record_test_scores, scores_test_split
from fedlora.task import heldout_rows, load_task, partition_rows, server_model

EVAL_BATCH = 64
Record = dict[str, Any]


def train_and_track(cfg: RunConfig, rows: list[dict], batch_size: int, seed: int,
                    on_round: Callable[[int, Record], None]) -> ExampleOutputs | None:
    """Train a fresh adapted model on ``rows`` for ``rounds × local-steps`` steps, reporting each round;
    return its results on the test split (None when the run scores none)."""
    task = load_task(cfg)
    device = pick_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    heldout = heldout_rows(cfg)
    model = server_model(cfg, str(device))
    optimizer = make_optimizer(set_trainable(model), cfg)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    on_round(0, {"train_loss": None, **evaluate_rows(model, heldout, task.kind, task.pad_id, EVAL_BATCH, device, amp)})
    for server_round in range(1, cfg.num_server_rounds + 1):
        loss = train_steps(model, rows, task.kind, task.pad_id, optimizer, cfg.local_steps, batch_size,
                           generator, device, amp)
        on_round(server_round, {"train_loss": loss,
                                **evaluate_rows(model, heldout, task.kind, task.pad_id, EVAL_BATCH, device, amp)})
    return outputs_on_test_split(cfg, model, device, amp) if scores_test_split(cfg) else None


def centralized_records(cfg: RunConfig, num_clients: int) -> tuple[list[Record], list[ExampleOutputs]]:
    """Per-round records of centralized LoRA on the pooled partitions (batch ``batch-size × num_clients``),
    and its test results."""
    pooled = [row for pid in range(num_clients) for row in partition_rows(cfg, pid, num_clients)]
    records: list[Record] = []
    outputs = train_and_track(cfg, pooled, centralized_batch_size(cfg.batch_size, num_clients),
                              cfg.seed * 1_000_003 + 7, lambda r, m: records.append({"round": r, **m}))
    return records, [outputs] if outputs is not None else []


def local_only_records(cfg: RunConfig, num_clients: int) -> tuple[list[Record], list[ExampleOutputs]]:
    """Per-round records of local-only training, metrics averaged over clients (per-client values kept),
    and every client model's test results."""
    per_client: list[list[Record]] = []
    outputs: list[ExampleOutputs] = []
    for pid in range(num_clients):
        records: list[Record] = []
        tested = train_and_track(cfg, partition_rows(cfg, pid, num_clients), cfg.batch_size,
                                 cfg.seed * 1_000_003 + 11 + pid, lambda r, m: records.append(m))
        per_client.append(records)
        outputs += [tested] if tested is not None else []
    averaged = []
    for server_round in range(cfg.num_server_rounds + 1):
        at_round = [client[server_round] for client in per_client]
        record: Record = {"round": server_round}
        for key in at_round[0]:
            values = [m[key] for m in at_round if m[key] is not None]
            record[key] = mean(values) if values else None
            if key.startswith("eval_"):
                record[f"client_{key}"] = [m[key] for m in at_round]
        averaged.append(record)
    return averaged, outputs


def run_baseline(kind: str, cfg: RunConfig, num_clients: int, out: Path, config: dict[str, Any],
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``kind`` (``centralized`` or ``local-only``) and write ``out`` as a fedlora run directory."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    run_dir = RunDirectory(out)
    metric, higher_is_better = headline_metric(load_task(cfg).kind)
    records, outputs = (centralized_records if kind == "centralized" else local_only_records)(cfg, num_clients)
    for record in records:
        record.update({"strategy": kind, "bytes_up": 0, "bytes_down": 0,
                       "num_clients": 1 if kind == "centralized" else num_clients})
        run_dir.append_metrics(record)
        echo(f"[fedlora] round {record['round']}/{cfg.num_server_rounds} {metric}={record[metric]:.4f} "
             f"eval_loss={record['eval_loss']:.4f}")
    pick = max if higher_is_better else min
    best = pick(records, key=lambda r: r[metric])
    summary = {
        "strategy": kind, "rounds": cfg.num_server_rounds, "metric": metric,
        "initial": records[0][metric], "final": records[-1][metric], "best": best[metric], "best_round": best["round"],
        "final_eval_loss": records[-1]["eval_loss"], "total_bytes_up": 0, "total_bytes_down": 0,
        "final_epsilon": None, "wall_seconds": time.monotonic() - started, "run_dir": str(out),
        **(record_test_scores(cfg, outputs, out) if outputs else {}),
    }
    run_dir.write_summary(summary)
    return summary
