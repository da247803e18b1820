"""Simulation scale: 1,000 virtual clients, a few sampled per round; memory per round and where time goes.

Uses the in-process runtime (:class:`fedlora.runtime.inprocess.InProcessGrid`: one ``Context`` per
virtual node, real Flower Messages, ClientApp calls in this process), driven like
:func:`fedlora.runtime.inprocess.run_inprocess` but with the ClientApp wrapped in a timer that also
reads the resident set size after every call, so each round reports its peak RSS and the
share of its ``round_seconds`` spent inside client training. The memory of the node
contexts themselves is measured with tracemalloc when the grid is built, and their state
after the run. With ``--flwr`` the same job also runs as ``flwr run`` with that many
supernodes (per-round time only). ``device`` is the run config's (``auto``: CUDA when present).
The embedded chatterbot-topics has 619 training rows, fewer than 1,000 clients, so the job
trains on a synthetic JSONL classification set of ``--rows-per-client`` rows per client
(random words, 4 labels), with the server's held-out evaluation capped at 200 examples.

    python -m benchmarks scale [--nodes 1000] [--fraction 0.01] [--rounds 5] [--model tiny-bert] [--flwr]
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.common import machine_line, markdown_table, read_metrics, rss_bytes
from fedlora.run_config import full_defaults
from fedlora.runtime.inprocess import SERVER_NODE, InProcessGrid
from fedlora.runtime.launch import run_simulation

MiB = 2**20
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima")


def synthetic_dataset(path: Path, rows: int, seed: int = 0) -> Path:
    """A JSONL classification set (``text``, ``label``) of ``rows`` rows of 12 random words, 4 labels."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=12)), "label": f"topic-{i % 4}"}) + "\n")
    return path


class TimedClientApp:
    """Calls the ClientApp; per server round: seconds inside it, calls, peak RSS after a call; contexts seen."""

    def __init__(self, app: ClientApp) -> None:
        self.app = app
        self.seconds: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)
        self.rss: dict[int, int] = defaultdict(int)
        self.contexts: dict[int, Context] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        server_round = int(message.content["config"]["server-round"])
        start = time.perf_counter()
        reply = self.app(message, context)
        self.seconds[server_round] += time.perf_counter() - start
        self.calls[server_round] += 1
        self.rss[server_round] = max(self.rss[server_round], rss_bytes())
        self.contexts[context.node_id] = context
        return reply


def context_state_bytes(contexts: dict[int, Context]) -> int:
    """Bytes held in the node states (array, config and metric records) of ``contexts``."""
    return sum(record.count_bytes() for c in contexts.values() for record in c.state.values())


def run_in_process(run_config: dict[str, Any], nodes: int) -> tuple[TimedClientApp, int]:
    """One in-process run; returns the timed app and the bytes tracemalloc saw for building the grid."""
    from fedlora.client.app import app as client_app
    from fedlora.server.app import main as server_main

    run_id = secrets.randbits(62)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE, run_id
    timed = TimedClientApp(client_app)
    tracemalloc.start()
    grid = InProcessGrid(timed, run_config, nodes, run_id)
    grid_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    server_main(grid, Context(run_id=run_id, node_id=SERVER_NODE, node_config={}, state=RecordDict(),
                              run_config=run_config))
    return timed, grid_bytes


def report(records: list[dict], timed: TimedClientApp) -> str:
    rows = []
    for r in records:
        if r["round"] == 0:
            continue
        n = r["round"]
        rows.append([n, int(timed.calls[n]), f"{r['round_seconds']:.2f}", f"{timed.seconds[n]:.2f}",
                     f"{timed.seconds[n] / r['round_seconds'] * 100:.0f}%", f"{timed.rss[n] / MiB:.0f}"])
    return markdown_table(["round", "clients", "round s", "in ClientApp s", "share", "RSS after round's calls MiB"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.01, help="fraction-train")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--rows-per-client", type=int, default=10)
    parser.add_argument("--flwr", action="store_true", help="also run it as flwr run with --nodes supernodes")
    args = parser.parse_args(argv)
    print(f"start: {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedlora-scale-bench-") as tmp:
        rows = int(args.nodes * args.rows_per_client / 0.8) + 1
        data = synthetic_dataset(Path(tmp) / "synthetic.jsonl", rows)
        job = {"model.name": args.model, "num-server-rounds": args.rounds, "fraction-train": args.fraction,
               "local-steps": args.local_steps, "batch-size": args.batch_size, "dataset.name": str(data),
               "dataset.task": "classification", "dataset.eval-max-examples": 200}
        out = Path(tmp) / "inprocess"
        rss_before = rss_bytes()
        started = time.perf_counter()
        timed, grid_bytes = run_in_process({**full_defaults(), **job, "output-dir": str(out)}, args.nodes)
        total = time.perf_counter() - started
        print(f"job: {job}, {args.nodes} virtual nodes (in-process grid); whole run {total:.1f} s; "
              f"RSS before the run {rss_before / MiB:.0f} MiB")
        print(f"grid with {args.nodes} node contexts: {grid_bytes / 1024:.0f} KiB "
              f"({grid_bytes / args.nodes:.0f} B per node); node state after the run, over the "
              f"{len(timed.contexts)} nodes ever sampled: {context_state_bytes(timed.contexts)} B")
        print(report(read_metrics(out), timed))
        if args.flwr:
            started = time.perf_counter()
            result = run_simulation({**job, "output-dir": str(Path(tmp) / "flwr")}, num_supernodes=args.nodes,
                                    echo=False, timeout=900)
            total = time.perf_counter() - started
            if result.ok and result.run_dir is not None:
                seconds = [f"{r['round_seconds']:.2f}" for r in read_metrics(result.run_dir) if r["round"] > 0]
                print(f"flwr run, {args.nodes} supernodes: round_seconds {', '.join(seconds)}; whole run {total:.1f} s")
            else:
                print(f"flwr run, {args.nodes} supernodes: {result.status} after {total:.1f} s\n{result.output[-2000:]}")
    print(f"end: {machine_line()}")


if __name__ == "__main__":
    main()
