"""The GPU check of issue 17: SmolLM2 on a 4-bit and on a bf16 base, with and without DP, on this machine's GPU.

For each variant (``nf4``, ``nf4+dp``, ``bf16``, ``bf16+dp``; the switches of
:mod:`benchmarks.client_memory`), in a process of its own:

1. one client's peak memory and step time (:func:`benchmarks.client_memory.measure`);
2. one short federated run through fedlora's ServerApp and ClientApp in that process
   (:func:`fedlora.runtime.inprocess.run_inprocess`): 2 clients, ``--rounds`` rounds of ``--steps``
   local steps on chatterbot-qa, evaluated by the server on ``--eval-examples`` held-out rows, and
   whether that held-out loss fell from round 0 to the last round; its peak GPU memory (server and
   clients in one process: two bases).

It runs on CUDA when present (``device = auto``), else on the CPU — slow at SmolLM2's size; use
``--model tiny-llama`` there for a smoke run. The exit status is 1 when a variant fails or its loss
does not fall. A GPU machine with the project's set-up runs it in a few minutes:

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.gpu_check [--model smollm2] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.client_memory import measure, run_config
from benchmarks.common import machine_line, markdown_table, read_metrics

VARIANTS = ("nf4", "nf4+dp", "bf16", "bf16+dp")
PROJECT_DIR = Path(__file__).resolve().parent.parent
#: the DP setting of the ``dp`` switch in the federated run: enough noise to matter, little enough to learn in a few
#: rounds (σ is fixed, not calibrated to a budget; ε is reported)
DP_RUN = {"dp.noise-multiplier": 0.3, "dp.max-grad-norm": 1.0}


def federated_run(model: str, variant: str, args: argparse.Namespace, out: Path) -> dict:
    """One short in-process federated run of ``variant``: its held-out losses, ε, wall time and peak GPU memory."""
    from fedlora.runtime.inprocess import run_inprocess

    flat = run_config(model, variant, args.batch, args.length, args.device)
    if "dp" in variant.split("+"):
        flat.update(DP_RUN)
    flat.update({"num-server-rounds": args.rounds, "local-steps": args.steps, "lr": args.lr,
                 "dataset.eval-max-examples": args.eval_examples, "output-dir": str(out)})
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_inprocess(flat, num_nodes=2)
    seconds = time.perf_counter() - start
    records = read_metrics(out)
    losses = [r.get("eval_loss") for r in records]
    return {"eval_loss": losses, "loss_fell": None not in losses and losses[-1] < losses[0],
            "epsilon": records[-1].get("epsilon_max"), "run_seconds": seconds,
            "run_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def one(variant: str, args: argparse.Namespace) -> dict:
    """Both measurements of one variant, in this process."""
    step = measure(args.model, variant, args.batch, args.length, args.measure_steps, 2, 1, args.device)
    with tempfile.TemporaryDirectory(prefix="fedlora-gpu-check-") as tmp:
        run = federated_run(args.model, variant, args, Path(tmp) / "run")
    return {"variant": variant, "seconds_per_step": step.seconds_per_step, "peak_mib": step.peak_mib,
            "estimate_mib": step.estimate_mib, **run}


def in_subprocess(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--one", variant, "--model", args.model,
           "--batch", str(args.batch), "--length", str(args.length), "--rounds", str(args.rounds),
           "--steps", str(args.steps), "--measure-steps", str(args.measure_steps), "--lr", str(args.lr),
           "--eval-examples", str(args.eval_examples), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_DIR)
    if done.returncode != 0:
        return {"variant": variant, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
                "loss_fell": False}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], "", "", "", "", "", f"failed: {r['error'][:120]}"])
            continue
        losses = " → ".join(f"{x:.3f}" for x in (r["eval_loss"][0], r["eval_loss"][-1]))
        run_peak = f"{r['run_peak_mib']:,.0f}" if r["run_peak_mib"] is not None else "-"
        epsilon = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
        rows.append([r["variant"], f"{r['seconds_per_step']:.3f}", f"{r['peak_mib']:,.0f}", f"{r['estimate_mib']:,.0f}",
                     run_peak, epsilon, f"{losses} ({'falls' if r['loss_fell'] else 'does not fall'}, "
                                        f"{r['run_seconds']:.0f} s)"])
    return markdown_table(["variant", "s/step", "client peak MiB", "estimate MiB", "run peak MiB", "ε",
                           "held-out loss round 0 → last"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="local steps per round of the federated run")
    parser.add_argument("--measure-steps", type=int, default=5, help="steps per timed call of the step measurement")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--one", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: running on the CPU (slow at SmolLM2's size; --model tiny-llama for a smoke run)")
    print(f"start: {machine_line()}", flush=True)
    results = []
    for variant in args.variants.split(","):
        results.append(in_subprocess(variant, args))
        print(f"{variant}: {'failed' if 'error' in results[-1] else 'done'}", flush=True)
    print(f"end: {machine_line()}; {args.model}, batch {args.batch} x {args.length}, {args.rounds} rounds x "
          f"{args.steps} steps, 2 clients")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [r["variant"] for r in results if not r["loss_fell"]]
    print(f"check failed for: {', '.join(failed)}" if failed else "all variants trained and their held-out loss fell")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
