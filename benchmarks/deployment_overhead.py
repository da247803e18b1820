"""Deployment vs simulation: wall time per round of the same small job, run both ways on one machine.

Deployment is the secure loopback federation of :mod:`fedlora.deployment.loopback` (SuperLink
with TLS and SuperNode authentication, two SuperNodes each with its own SuperExec, all on
127.0.0.1): every message starts a fresh ClientApp process and the SuperNodes poll every
~3 s. Simulation is ``flwr run`` on an isolated local SuperLink with two virtual nodes
(:func:`fedlora.runtime.launch.run_simulation`), whose ClientApp process lives across rounds.
The two runs go one after the other, never overlapping. Per-round time is the ServerApp's
own ``round_seconds`` (metrics.jsonl: send, local training, replies, aggregation and the
held-out evaluation); round 1 also pays each runtime's cold start, so the comparison is
reported for round 1 and for the mean of the later rounds separately. "Whole run" is the
wall time of ``flwr run`` from submit to finish: for deployment with the federation already
up; for simulation including the start of its local SuperLink and Ray.

    python benchmarks/deployment_overhead.py [--rounds 4] [--local-steps 3] [--model tiny-bert]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fedlora.deployment.loopback import LoopbackFederation
from fedlora.runtime.launch import PROJECT_DIR, LaunchResult, run_simulation


def round_seconds(result: LaunchResult) -> list[float]:
    """``round_seconds`` of rounds 1..N from a completed run's metrics.jsonl."""
    if not result.ok or result.run_dir is None:
        raise RuntimeError(f"run did not complete ({result.status}):\n{result.output[-3000:]}")
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r["round_seconds"]) for r in records if r["round"] > 0]


def deployed(job: dict, work: Path) -> tuple[LaunchResult, float]:
    certs = work / "certs"
    subprocess.run([str(PROJECT_DIR / "deploy" / "make_certs.sh"), "--out", str(certs), "--nodes", "2"], check=True,
                   capture_output=True, timeout=120)
    with LoopbackFederation(work / "loopback", certs) as federation:
        node_ids = {federation.register(1), federation.register(2)}
        for index in (1, 2):
            federation.start_supernode(f"supernode-{index}", {"partition-id": index - 1, "num-partitions": 2},
                                       key_index=index)
        federation.wait_online(node_ids)
        start = time.monotonic()
        result = federation.run({**job, "output-dir": str(work / "deployed")}, timeout=1800)
        return result, time.monotonic() - start


def simulated(job: dict, work: Path) -> tuple[LaunchResult, float]:
    start = time.monotonic()
    result = run_simulation({**job, "output-dir": str(work / "simulated")}, num_supernodes=2, echo=False, timeout=1800)
    return result, time.monotonic() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="server rounds (default 4; at least 2)")
    parser.add_argument("--local-steps", type=int, default=3, help="local steps per client per round (default 3)")
    parser.add_argument("--model", default="tiny-bert", help="model.name (default tiny-bert)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 includes cold start)")
    job = {"model.name": args.model, "num-server-rounds": args.rounds, "local-steps": args.local_steps,
           "batch-size": 8, "dataset.max-length": 32}
    with tempfile.TemporaryDirectory(prefix="fedlora-deploy-bench-") as tmp:
        dep_result, dep_total = deployed(job, Path(tmp))
        sim_result, sim_total = simulated(job, Path(tmp))
        dep, sim = round_seconds(dep_result), round_seconds(sim_result)
    print(f"job: {json.dumps(job)}, 2 nodes")
    print("| round | deployment (s) | simulation (s) | ratio |")
    print("|------:|---------------:|---------------:|------:|")
    for i, (d, s) in enumerate(zip(dep, sim), start=1):
        print(f"| {i} | {d:.2f} | {s:.2f} | {d / s:.1f}x |")
    dep_later, sim_later = statistics.mean(dep[1:]), statistics.mean(sim[1:])
    print(f"| mean of rounds 2..{args.rounds} | {dep_later:.2f} | {sim_later:.2f} | {dep_later / sim_later:.1f}x |")
    print(f"| whole run (submit to finish) | {dep_total:.1f} | {sim_total:.1f} | {dep_total / sim_total:.1f}x |")


if __name__ == "__main__":
    main()
