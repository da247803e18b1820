"""Framework overhead: a simulated round's wall time vs the pure local compute of the same steps.

Three ways to do the same rounds of the same job (default: the embedded classification
default, minilm on chatterbot-topics, FedAvg, 4 clients, 20 local steps of batch 16):

* ``flwr run``: a real simulation on an isolated local SuperLink (:func:`fedlora.runtime.launch.run_simulation`);
* in-process: ServerApp and ClientApp in one process with real Flower Messages
  (:func:`fedlora.runtime.inprocess.run_inprocess`);
* pure compute: the same model, partitions and ``train_steps`` calls for every client, one
  after the other, then the server's held-out evaluation — no Messages, no records.

Round time is the ServerApp's ``round_seconds`` (metrics.jsonl) for the two runtimes and the
wall time of the loop for pure compute. Round 1 pays each runtime's cold start (model and
data loading; Ray for ``flwr run``), so the overhead is judged on rounds 2..N: their mean,
and their minimum (the least-disturbed round, robust on a shared machine). The three run
one after the other. ``device`` is the run config's (``auto``: CUDA when present).

    python -m benchmarks overhead [--rounds 3] [--nodes 4] [--local-steps 20] [--batch-size 16] [--no-flwr]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_line, markdown_table, read_metrics
from fedlora.adapters.lora import load_adapter_state, set_trainable
from fedlora.client.loop import make_optimizer, train_steps
from fedlora.run_config import full_defaults, load_config
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.runtime.inprocess import run_inprocess
from fedlora.runtime.launch import run_simulation
from fedlora.task import adapted_model, heldout_rows, load_task, partition_rows, server_model


def round_seconds(run_dir: Path) -> list[float]:
    """``round_seconds`` of rounds 1..N of a finished run."""
    return [float(r["round_seconds"]) for r in read_metrics(run_dir) if r["round"] > 0]


def with_flwr(job: dict[str, Any], nodes: int, out: Path) -> list[float]:
    result = run_simulation({**job, "output-dir": str(out)}, num_supernodes=nodes, echo=False, timeout=1800)
    if not result.ok or result.run_dir is None:
        raise RuntimeError(f"flwr run did not complete ({result.status}):\n{result.output[-3000:]}")
    return round_seconds(result.run_dir)


def in_process(job: dict[str, Any], nodes: int, out: Path) -> list[float]:
    run_inprocess({**job, "output-dir": str(out)}, num_nodes=nodes)
    return round_seconds(out)


def pure_compute(job: dict[str, Any], nodes: int) -> list[float]:
    """Per round: every client's ``train_steps`` from the global adapter, then the held-out evaluation.

    Model, partitions and held-out rows are loaded before the first round (the runtimes load
    them once per process as well); the global adapter stays the initial one, which costs
    the same compute as an updated one.
    """
    cfg = load_config({**full_defaults(), **job})
    device = pick_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    task = load_task(cfg)
    model = adapted_model(cfg, str(device))
    server = server_model(cfg, str(device))
    heldout = heldout_rows(cfg)
    partitions = [partition_rows(cfg, p, nodes) for p in range(nodes)]
    times = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        start = time.perf_counter()
        for partition_id, rows in enumerate(partitions):
            load_adapter_state(model, model.initial_state)
            params = set_trainable(model)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + server_round * 1_009 + partition_id)
            train_steps(model, rows, task.kind, task.pad_id, make_optimizer(params, cfg), cfg.local_steps,
                        cfg.batch_size, generator, device, amp)
        evaluate_rows(server, heldout, task.kind, task.pad_id, 64, device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def report(results: dict[str, list[float]]) -> str:
    """Per round, then the mean and the minimum of rounds 2..N, each with its overhead over pure compute.

    On a shared machine the minimum (the least-disturbed round) is the robust estimate;
    the mean shows how much other load moved the numbers.
    """
    later = {name: times[1:] or times for name, times in results.items()}
    pure_mean, pure_min = statistics.mean(later["pure compute"]), min(later["pure compute"])
    rounds = len(results["pure compute"])
    rows = []
    for name, times in results.items():
        mean, low = statistics.mean(later[name]), min(later[name])
        rows.append([name, *(f"{t:.2f}" for t in times), f"{mean:.2f}", f"{(mean / pure_mean - 1) * 100:+.1f}%",
                     f"{low:.2f}", f"{(low / pure_min - 1) * 100:+.1f}%"])
    span = f"rounds 2..{rounds}"
    header = ["mode", *(f"round {i} s" for i in range(1, rounds + 1)), f"mean {span} s", "overhead (mean)",
              f"min {span} s", "overhead (min)"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default="chatterbot-topics")
    parser.add_argument("--no-flwr", action="store_true", help="skip the flwr run simulation")
    args = parser.parse_args(argv)
    job = {"model.name": args.model, "dataset.name": args.dataset, "num-server-rounds": args.rounds,
           "local-steps": args.local_steps, "batch-size": args.batch_size, "strategy": "fedavg"}
    print(f"start: {machine_line()}", flush=True)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedlora-overhead-bench-") as tmp:
        if not args.no_flwr:
            results["flwr run"] = with_flwr(job, args.nodes, Path(tmp) / "flwr")
        results["in-process"] = in_process(job, args.nodes, Path(tmp) / "inprocess")
        results["pure compute"] = pure_compute(job, args.nodes)
    print(f"job: {job}, {args.nodes} nodes")
    print(report(results))
    print(f"end: {machine_line()}")


if __name__ == "__main__":
    main()
