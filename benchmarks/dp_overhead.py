"""Client training throughput, DP vs non-DP: tokens/s, time per step and peak memory, LoRA r=8.

Variants per model: plain training (``fedlora.client.loop.train_steps``) and Opacus DP-SGD
(``fedlora.privacy.sample_dp.dp_train_steps``) in ``hooks`` and ``ghost`` mode, σ = 1,
C = 1, AdamW. Every step sees the same full batch of fixed-length random token rows
(the client holds exactly one batch, so Poisson sampling with q = 1 keeps every row).
Each variant runs in its own process, so model loading, caches and peak memory of one
variant never leak into another. Time is the median over the timed steps, each a separate
call (so a DP step includes attaching and detaching the Opacus hooks, which a client pays
once per round: an upper bound on the overhead). Peak memory is the extra memory during
warm-up and timed steps over the level right after loading the model:
``torch.cuda.max_memory_allocated`` on CUDA; resident set size sampled every 5 ms from
``/proc/self/statm`` on CPU (Linux). Throughput is the batch's tokens (rows × tokens per
row, padding included: every row has the full length) over the time per step.

    python -m benchmarks throughput [--models minilm,smollm2] [--variants none,hooks,ghost] [--steps 3] [--warmup 1] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import RssPeak, machine_line, rss_bytes

MODELS = {  # name: (task, batch size, tokens per row)
    "minilm": ("classification", 32, 64),
    "smollm2": ("instruction", 8, 128),
}
VARIANTS = ("none", "hooks", "ghost")
PROJECT_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Measurement:
    model: str
    variant: str
    seconds_per_step: float
    peak_mib: float


def make_rows(task: str, batch: int, length: int, vocab: int, generator: torch.Generator) -> list[dict]:
    rows = []
    for i in range(batch):
        ids = torch.randint(1000, vocab, (length,), generator=generator).tolist()
        if task == "classification":
            rows.append({"input_ids": ids, "label": i % 4})
        else:
            prompt = length // 4
            rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def measure(model_name: str, variant: str, steps: int, warmup: int, device_name: str) -> Measurement:
    """Load the adapted model in this process, warm up, then time ``steps`` steps of one variant."""
    from fedlora.adapters.lora import inject_lora, set_trainable
    from fedlora.client.loop import train_steps
    from fedlora.config import LoraConfig
    from fedlora.device import pick_device
    from fedlora.models.loading import load_base_model, load_tokenizer
    from fedlora.privacy.sample_dp import dp_train_steps

    task, batch, length = MODELS[model_name]
    device = pick_device(device_name)
    tokenizer = load_tokenizer(model_name)
    model = inject_lora(load_base_model(model_name, task, 4), LoraConfig(rank=8, alpha=16), task, seed=0).to(device)
    params = set_trainable(model)
    generator = torch.Generator().manual_seed(0)
    rows = make_rows(task, batch, length, len(tokenizer), generator)
    pad = int(tokenizer.pad_token_id)

    def adamw(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=5e-3)

    def run(n: int) -> None:
        if variant == "none":
            train_steps(model, rows, task, pad, adamw(params), n, batch, generator, device)
        else:
            dp_train_steps(model, rows, task, pad, adamw, n, batch, 1.0, 1.0, variant, generator, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: list[float] = []

    def timed_steps() -> None:
        run(warmup)
        for _ in range(steps):
            start = time.perf_counter()
            run(1)
            times.append(time.perf_counter() - start)

    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed_steps()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        with RssPeak() as rss:
            timed_steps()
        peak = rss.peak - base
    return Measurement(model_name, variant, statistics.median(times), peak / 2**20)


def in_subprocess(model_name: str, variant: str, args: argparse.Namespace) -> Measurement:
    cmd = [sys.executable, "-m", "benchmarks.dp_overhead", "--one", model_name, variant, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_DIR)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name}/{variant} failed:\n{done.stderr[-3000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def table(results: list[Measurement]) -> str:
    lines = ["| model | variant | tokens/s | s/step | × non-DP | peak extra MiB | × non-DP |", "|---|---|---|---|---|---|---|"]
    base = {r.model: r for r in results if r.variant == "none"}
    for r in results:
        b = base[r.model]
        mem_ratio = f"{r.peak_mib / b.peak_mib:.2f}" if b.peak_mib > 0 else "n/a"
        _, batch, length = MODELS[r.model]
        lines.append(f"| {r.model} | {'non-DP' if r.variant == 'none' else 'DP ' + r.variant} | "
                     f"{batch * length / r.seconds_per_step:.0f} | {r.seconds_per_step:.3f} | "
                     f"{r.seconds_per_step / b.seconds_per_step:.2f} | {r.peak_mib:.0f} | {mem_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="among none (no DP, the baseline: required), hooks, ghost")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        m = measure(args.one[0], args.one[1], args.steps, args.warmup, args.device)
        print(json.dumps(m.__dict__))
        return
    print(f"start: {machine_line()}", flush=True)
    results = [in_subprocess(name, variant, args) for name in args.models.split(",")
               for variant in args.variants.split(",")]
    print(f"end: {machine_line()}; device {args.device}, median of {args.steps} timed steps after {args.warmup} warm-up")
    print(table(results))


if __name__ == "__main__":
    main()
