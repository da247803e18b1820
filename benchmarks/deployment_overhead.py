"""Deployment vs simulation: wall time per warm round of the same job, run three ways on one machine.

* **simulation**: ``flwr run`` on an isolated local SuperLink with virtual nodes
  (:func:`fedlora.runtime.launch.run_simulation`), whose ClientApp process lives across rounds;
* **deployed, fedlora runners**: the secure loopback federation of
  :mod:`fedlora.deployment.loopback` (TLS, SuperNode authentication, everything on 127.0.0.1)
  with fedlora's persistent ServerApp and ClientApp runners;
* **deployed, Flower SuperExec**: the same federation with Flower's ``flower-superexec``,
  which starts a fresh ClientApp process (torch import, model load) for every message.

The runs go one after the other, never overlapping. Per-round time is the ServerApp's own
``round_seconds`` (send, local training, replies, aggregation, held-out evaluation); round
1 pays each runtime's cold start, so the table reports the mean of the warm rounds 2..N and
their overhead over the simulated round. The floor of a deployed round is Flower's polling:
an idle SuperNode pulls the SuperLink every 3 s (``flwr/supernode/start_client_internal.py``;
fedlora's round loop polls for replies every 0.25 s itself instead of Flower's 3 s Grid wait,
``flwr/superlink/grid/http_grid.py``), so the target is (deployed − simulated) ≤ 3 × 3 s per
warm round. "loads" counts the base
models each site's runner built for the run (from its log; one is the target).

    python -m benchmarks deployment [--models tiny-bert,minilm] [--rounds 4] [--local-steps 3] [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import machine_line, markdown_table
from fedlora.deployment.loopback import RUNNERS, LoopbackFederation
from fedlora.runtime.launch import PROJECT_DIR, LaunchResult, run_simulation

#: Flower 1.39's poll interval of an idle SuperNode and of the ServerApp Grid waiting for replies (seconds)
FLOWER_POLL_SECONDS = 3.0


def round_seconds(result: LaunchResult) -> list[float]:
    """``round_seconds`` of rounds 1..N from a completed run's metrics.jsonl."""
    if not result.ok or result.run_dir is None:
        raise RuntimeError(f"run did not complete ({result.status}):\n{result.output[-3000:]}")
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r["round_seconds"]) for r in records if r["round"] > 0]


def base_model_loads(federation: LoopbackFederation, run_id: int, nodes: int) -> list[int]:
    """Base models each site's fedlora runner built for ``run_id`` (from its log)."""
    loads = []
    for i in range(1, nodes + 1):
        log = federation.log(f"supernode-{i}-runner")
        tasks = re.findall(rf"task (\d+) of run {run_id}:", log)
        loads.append(sum(int(n) for t in tasks for n in re.findall(rf"task {t} done \(\w+\); base models loaded for it: (\d+)", log)))
    return loads


def deployed(job: dict, work: Path, nodes: int, runner: str) -> tuple[list[float], list[int] | None]:
    certs = work / "certs"
    if not certs.exists():
        subprocess.run([str(PROJECT_DIR / "deploy" / "make_certs.sh"), "--out", str(certs), "--nodes", str(nodes)],
                       check=True, capture_output=True, timeout=120)
    with LoopbackFederation(work / f"loopback-{runner}", certs, runner=runner) as federation:
        node_ids = {federation.register(i) for i in range(1, nodes + 1)}
        for i in range(1, nodes + 1):
            federation.start_supernode(f"supernode-{i}", {"partition-id": i - 1, "num-partitions": nodes}, key_index=i)
        federation.wait_online(node_ids)
        result = federation.run({**job, "output-dir": str(work / f"deployed-{runner}")}, timeout=3600)
        seconds = round_seconds(result)
        loads = base_model_loads(federation, result.run_id, nodes) if runner == "fedlora" else None
    return seconds, loads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-bert,minilm", help="model.name values (default tiny-bert,minilm)")
    parser.add_argument("--rounds", type=int, default=4, help="server rounds (default 4; at least 2)")
    parser.add_argument("--local-steps", type=int, default=3, help="local steps per client per round (default 3)")
    parser.add_argument("--nodes", type=int, default=2, help="sites (default 2)")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"deployed runners to measure (default {','.join(RUNNERS)})")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 includes cold start)")
    print(f"start: {machine_line()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedlora-deploy-bench-") as tmp:
        for model in args.models.split(","):
            job = {"model.name": model, "num-server-rounds": args.rounds, "local-steps": args.local_steps,
                   "batch-size": 8, "dataset.max-length": 32}
            work = Path(tmp) / model
            sim = round_seconds(run_simulation({**job, "output-dir": str(work / "simulated")}, num_supernodes=args.nodes,
                                               echo=False, timeout=3600))
            sim_warm = statistics.mean(sim[1:])
            rows.append([model, "simulation", f"{sim[0]:.2f}", f"{sim_warm:.2f}", "-", "-", "-"])
            for runner in args.runners.split(","):
                dep, loads = deployed(job, work, args.nodes, runner)
                warm = statistics.mean(dep[1:])
                rows.append([model, f"deployed, {runner}", f"{dep[0]:.2f}", f"{warm:.2f}", f"{warm - sim_warm:.2f}",
                             f"{warm / sim_warm:.1f}x", "-" if loads is None else ", ".join(map(str, loads))])
                print(f"{model} {runner}: rounds {[round(s, 2) for s in dep]}", flush=True)
    print(f"{args.nodes} sites, {args.rounds} rounds × {args.local_steps} local steps, batch 8 × 32 tokens; "
          f"target: warm overhead ≤ 3 × {FLOWER_POLL_SECONDS:g} s = {3 * FLOWER_POLL_SECONDS:g} s")
    print(markdown_table(["model", "runtime", "round 1 (s)", f"warm rounds 2..{args.rounds} (s)",
                          "overhead vs simulation (s)", "ratio", "base model loads per site"], rows))
    print(f"end: {machine_line()}")


if __name__ == "__main__":
    main()
