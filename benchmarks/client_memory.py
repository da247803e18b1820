"""One client's peak memory and step time by base precision, quantization, gradient checkpointing and DP.

Each variant is a ``+``-joined set of switches over the run config — ``fp32`` / ``bf16`` (``model.dtype``),
``nf4`` / ``int8`` (``model.quantization``), ``ckpt`` (``model.gradient-checkpointing``), ``dp``
(``dp.mode = sample``, hooks, σ = 1, C = 1) — and runs fedlora's own client path: the
resident adapted model of :func:`fedlora.task.adapted_model` and the local loop of
:func:`fedlora.client.loop.train_steps` (or :func:`fedlora.privacy.sample_dp.dp_train_steps`) on
fixed rows of random tokens (LoRA r = 8 on peft's default targets, AdamW). Every variant runs
in its own process: ``--warmup`` steps, then ``--rounds`` timed calls of ``--steps`` steps; the
time per step is the median call's.

Peak memory is what the client holds while it trains: on CUDA ``torch.cuda.max_memory_allocated``
over the steps (weights included); on a CPU the peak resident set size during the steps
(``VmHWM``, reset after loading through ``/proc/self/clear_refs``) minus the resident size
before the model loaded — so the transient of loading and converting a checkpoint is not
counted, and neither is the interpreter with torch imported. On a CPU that figure comes from
a second process of the variant (one warm-up and one step) that runs with glibc's mmap
threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every freed tensor leaves the
resident set at once instead of staying in malloc's heap; its steps are slower, so the times
come from the first process. Beside both, fedlora's estimate for the same setting
(:mod:`fedlora.models.memory`) without its fixed runtime term.

    python -m benchmarks memory [--model smollm2] [--variants fp32,bf16,fp32+ckpt,bf16+ckpt] [--batch 8]
                                [--length 128] [--steps 3] [--rounds 3] [--warmup 1] [--device auto]

The target of issue 17: ``bf16+ckpt`` at ≤ 0.5× the ``fp32`` peak and ≤ 1.5× its step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.client_step import make_rows
from benchmarks.common import machine_line, markdown_table, seconds_per_step

SWITCHES = {"fp32": {"model.dtype": "fp32"}, "bf16": {"model.dtype": "bf16"}, "nf4": {"model.quantization": "nf4"},
            "int8": {"model.quantization": "int8"}, "ckpt": {"model.gradient-checkpointing": True},
            "dp": {"dp.mode": "sample", "dp.noise-multiplier": 1.0, "dp.max-grad-norm": 1.0}}
DATASETS = {"instruction": "chatterbot-qa", "classification": "chatterbot-topics"}
DEFAULT_VARIANTS = "fp32,bf16,fp32+ckpt,bf16+ckpt"
PROJECT_DIR = Path(__file__).resolve().parent.parent
#: the variant every other one is compared with, and issue 17's target for bf16 + checkpointing
REFERENCE, TARGET, MEMORY_TARGET, TIME_TARGET = "fp32", "bf16+ckpt", 0.5, 1.5


@dataclass(frozen=True)
class Measurement:
    variant: str
    seconds_per_step: float
    peak_mib: float
    estimate_mib: float


def run_config(model: str, variant: str, batch: int, length: int, device: str) -> dict:
    """The run config of ``variant`` (see the module docstring) for ``model`` at ``batch`` × ``length``."""
    from fedlora.models.registry import BUILTIN_MODELS, DECODER

    task = "instruction" if BUILTIN_MODELS.get(model, DECODER) == DECODER else "classification"
    flat = {"model.name": model, "dataset.name": DATASETS[task], "batch-size": batch, "dataset.max-length": length,
            "device": device, "lr": 5e-3}
    for switch in variant.split("+"):
        if switch not in SWITCHES:
            raise ValueError(f"unknown switch {switch!r} in variant {variant!r}; switches: {', '.join(SWITCHES)}")
        flat.update(SWITCHES[switch])
    return flat


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(model: str, variant: str, batch: int, length: int, steps: int, rounds: int, warmup: int,
            device_name: str) -> Measurement:
    """In this process: build the client's model, warm up, then time ``rounds`` calls of ``steps`` steps."""
    import gc

    from fedlora.adapters.lora import set_trainable
    from fedlora.client.loop import make_optimizer, train_steps
    from fedlora.device import autocast_dtype, pick_device
    from fedlora.models.memory import RUNTIME
    from fedlora.privacy.sample_dp import dp_train_steps
    from fedlora.run_config import full_defaults, load_config
    from fedlora.task import adapted_model, check_memory, load_task

    device = pick_device(device_name)
    cfg = load_config({**full_defaults(), **run_config(model, variant, batch, length, str(device))})
    task = load_task(cfg)
    rows = make_rows(task.kind, batch, length, len(task.tokenizer), torch.Generator().manual_seed(0))
    if task.kind == "classification":
        rows = [{**r, "label": r["label"] % task.num_labels} for r in rows]
    estimate = check_memory(cfg, device, cfg.lora, True)
    gc.collect()
    before_kib = _status_kib("VmRSS")
    client = adapted_model(cfg, str(device))
    params = set_trainable(client)
    amp = autocast_dtype(cfg.precision, device)
    generator = torch.Generator().manual_seed(0)
    if cfg.dp.mode == "sample":
        def run(n: int) -> None:
            dp_train_steps(client, rows, task.kind, task.pad_id, lambda ps: make_optimizer(ps, cfg), n, batch,
                           cfg.dp.noise_multiplier, cfg.dp.max_grad_norm, cfg.dp.grad_sample_mode, generator, device,
                           amp)
    else:
        def run(n: int) -> None:
            train_steps(client, rows, task.kind, task.pad_id, make_optimizer(params, cfg), n, batch, generator,
                        device, amp)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from here
    seconds = seconds_per_step(run, steps, rounds, warmup, sync)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (_status_kib("VmHWM") - before_kib) * 1024
    return Measurement(variant, seconds, peak / 2**20, (estimate.total - RUNTIME) / 2**20)


#: glibc's malloc with a fixed mmap threshold: freed tensors leave the resident set at once (the CPU memory pass)
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _one(model: str, variant: str, args: argparse.Namespace, steps: int, rounds: int, warmup: int,
         env: dict[str, str] | None = None) -> Measurement:
    cmd = [sys.executable, "-m", "benchmarks.client_memory", "--one", variant, "--model", model,
           "--batch", str(args.batch), "--length", str(args.length), "--steps", str(steps),
           "--rounds", str(rounds), "--warmup", str(warmup), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_DIR, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{model}/{variant} failed:\n{done.stderr[-3000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def in_subprocess(model: str, variant: str, args: argparse.Namespace) -> Measurement:
    """The variant's times from one process and, on a CPU, its peak from a second (see the module docstring)."""
    timed = _one(model, variant, args, args.steps, args.rounds, args.warmup)
    from fedlora.device import pick_device

    if pick_device(args.device).type == "cuda":
        return timed
    exact = _one(model, variant, args, 1, 1, 1, EXACT_RSS_ENV)
    return Measurement(variant, timed.seconds_per_step, exact.peak_mib, timed.estimate_mib)


def table(results: list[Measurement]) -> str:
    """One row per variant: s/step and peak memory, each also as a multiple of the fp32 variant's, and the estimate."""
    reference = next((r for r in results if r.variant == REFERENCE), None)
    rows = []
    for r in results:
        time_x = f"{r.seconds_per_step / reference.seconds_per_step:.2f}x" if reference else ""
        mem_x = f"{r.peak_mib / reference.peak_mib:.2f}x" if reference and reference.peak_mib > 0 else ""
        rows.append([r.variant, f"{r.seconds_per_step:.3f}", time_x, f"{r.peak_mib:,.0f}", mem_x,
                     f"{r.estimate_mib:,.0f}"])
    return markdown_table(["variant", "s/step", f"time × {REFERENCE}", "peak MiB", f"memory × {REFERENCE}",
                           "estimate MiB"], rows)


def verdict(results: list[Measurement]) -> str | None:
    """Whether ``bf16+ckpt`` meets issue 17's target against ``fp32`` (None when either was not run)."""
    by = {r.variant: r for r in results}
    if REFERENCE not in by or TARGET not in by:
        return None
    memory = by[TARGET].peak_mib / by[REFERENCE].peak_mib
    slower = by[TARGET].seconds_per_step / by[REFERENCE].seconds_per_step
    met = memory <= MEMORY_TARGET and slower <= TIME_TARGET
    return (f"target {TARGET} ≤ {MEMORY_TARGET}x the {REFERENCE} peak at ≤ {TIME_TARGET}x its step time: "
            f"{memory:.2f}x memory, {slower:.2f}x time — {'met' if met else 'missed'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"'+'-joined switches among {', '.join(SWITCHES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed call")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls; the median is reported")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        m = measure(args.model, args.one, args.batch, args.length, args.steps, args.rounds, args.warmup, args.device)
        print(json.dumps(m.__dict__))
        return
    variants = args.variants.split(",")
    for variant in variants:
        run_config(args.model, variant, args.batch, args.length, args.device)  # unknown switches fail before any run
    print(f"start: {machine_line()}", flush=True)
    results = []
    for variant in variants:
        results.append(in_subprocess(args.model, variant, args))
        print(f"{args.model}/{variant}: {results[-1].seconds_per_step:.3f} s/step, {results[-1].peak_mib:,.0f} MiB",
              flush=True)
    print(f"end: {machine_line()}; {args.model}, batch {args.batch} x {args.length} tokens, device {args.device}, "
          f"median of {args.rounds} calls of {args.steps} steps after {args.warmup} warm-up steps")
    print(table(results))
    line = verdict(results)
    if line:
        print(line)


if __name__ == "__main__":
    main()
