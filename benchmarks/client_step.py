"""One client's local steps through fedlora's path vs the hand-written floor, and with DP vs plain Opacus.

Same model (the offline MiniLM or SmolLM2, LoRA r = 8 with peft's default targets, the head
trainable), same batch (fixed-length random token rows), AdamW, for each variant:

* **floor** — what a user writes by hand with peft and torch: ``get_peft_model``, the batch
  padded once, a fresh AdamW per round (as a federated client's), then
  ``model(**batch, labels=labels).loss.backward(); opt.step()``;
* **fedlora** — :func:`fedlora.client.loop.train_steps` on the adapter
  :func:`fedlora.adapters.lora.inject_lora` builds (the client's path: batches collated
  every step, fedlora's per-example loss);
* **opacus** — plain Opacus 1.6: ``PrivacyEngine().make_private`` (hooks mode, Poisson
  sampling) over a DataLoader of the same rows, σ = 1, C = 1;
* **fedlora-dp** — :func:`fedlora.privacy.sample_dp.dp_train_steps` (hooks mode), σ = 1, C = 1;
* **fedlora-dp-ghost** — the same in Opacus's ghost-clipping mode.

The client holds exactly one batch, so Poisson sampling at q = 1 keeps every row and every
variant steps on the same rows. Each variant runs in its own process (loading, caches and
peak memory of one never leak into another): ``--warmup`` steps, then ``--rounds`` timed
calls of ``--steps`` steps each (a fedlora call attaches and removes its DP hooks once, as a
round does; ``make_private`` is done once before the clock starts); time per step is the
median call over its steps. Peak memory is the whole process's (model included, the same in
every variant): ``torch.cuda.max_memory_allocated`` on CUDA, the peak resident set size on
CPU — not the extra over the level after loading, which on CPU depends on how much freed
memory the allocator happens to reuse (±30 % between processes running the same loop).
Device: the run config's rule (CUDA when present).

    python -m benchmarks client [--models minilm,smollm2] [--variants floor,fedlora,opacus,fedlora-dp,fedlora-dp-ghost]
                                [--steps 4] [--rounds 3] [--warmup 2] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import machine_line, markdown_table, seconds_per_step

MODELS = {  # name: (task, batch size, tokens per row)
    "minilm": ("classification", 32, 64),
    "smollm2": ("instruction", 8, 128),
}
VARIANTS = ("floor", "fedlora", "opacus", "fedlora-dp", "fedlora-dp-ghost")
#: variant -> the variant it is compared with
BASELINE = {"fedlora": "floor", "fedlora-dp": "opacus", "fedlora-dp-ghost": "opacus", "opacus": "floor"}
PROJECT_DIR = Path(__file__).resolve().parent.parent
LR, RANK, ALPHA, SIGMA, CLIP = 5e-3, 8, 16, 1.0, 1.0


@dataclass(frozen=True)
class Measurement:
    model: str
    variant: str
    seconds_per_step: float
    peak_mib: float


def make_rows(task: str, batch: int, length: int, vocab: int, generator: torch.Generator) -> list[dict]:
    """``batch`` rows of ``length`` random tokens: a label each (classification) or the prompt's first quarter masked."""
    rows = []
    for i in range(batch):
        ids = torch.randint(1000, vocab, (length,), generator=generator).tolist()
        if task == "classification":
            rows.append({"input_ids": ids, "label": i % 4})
        else:
            prompt = length // 4
            rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def padded(rows: list[dict]) -> dict[str, torch.Tensor]:
    """The rows as tensors, built by hand (every row has the full length: no padding needed)."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["label"] for r in rows]) if "label" in rows[0] else torch.tensor([r["labels"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_runner(model_name: str, variant: str, device: torch.device) -> Callable[[int], None]:
    """Load the model for ``variant`` and return ``run(n)``: n local steps of that variant on the fixed batch."""
    import peft

    from fedlora.adapters.lora import inject_lora, peft_config, set_trainable
    from fedlora.client.loop import train_steps
    from fedlora.config import LoraConfig
    from fedlora.models.loading import load_base_model, load_tokenizer
    from fedlora.privacy.sample_dp import dp_train_steps

    task, batch, length = MODELS[model_name]
    tokenizer = load_tokenizer(model_name)
    rows = make_rows(task, batch, length, len(tokenizer), torch.Generator().manual_seed(0))
    lora = LoraConfig(rank=RANK, alpha=ALPHA)
    base = load_base_model(model_name, task, 4)
    if variant.startswith("fedlora"):
        model = inject_lora(base, lora, task, seed=0).to(device)
        params = set_trainable(model)
        pad = int(tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(0)
        if variant == "fedlora":
            def run(n: int) -> None:
                train_steps(model, rows, task, pad, torch.optim.AdamW(params, lr=LR), n, batch, generator, device)
        else:
            mode = "ghost" if variant.endswith("ghost") else "hooks"

            def run(n: int) -> None:
                dp_train_steps(model, rows, task, pad, lambda ps: torch.optim.AdamW(ps, lr=LR), n, batch, SIGMA, CLIP,
                               mode, generator, device)
        return run
    model = peft.get_peft_model(base, peft_config(lora, task)).to(device)  # plain peft: the same adapter
    model.train()
    tensors = {k: v.to(device) for k, v in padded(rows).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if variant == "floor":
        def run(n: int) -> None:
            optimizer = torch.optim.AdamW(trainable, lr=LR)  # a round starts a fresh optimizer, as fedlora's does
            for _ in range(n):
                model(**tensors).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    from opacus import PrivacyEngine

    dataset = torch.utils.data.TensorDataset(tensors["input_ids"], tensors["attention_mask"], tensors["labels"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    private, dp_optimizer, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
        poisson_sampling=True)

    def run(n: int) -> None:
        done = 0
        while done < n:
            for ids, mask, labels in dp_loader:
                private(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                dp_optimizer.step()
                dp_optimizer.zero_grad(set_to_none=True)
                done += 1
                if done == n:
                    break
    return run


def measure(model_name: str, variant: str, steps: int, rounds: int, warmup: int, device_name: str) -> Measurement:
    """In this process: load, warm up, then time ``rounds`` calls of ``steps`` steps of one variant."""
    from fedlora.device import pick_device

    device = pick_device(device_name)
    run = step_runner(model_name, variant, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = seconds_per_step(run, steps, rounds, warmup, sync)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return Measurement(model_name, variant, seconds, peak / 2**20)


def in_subprocess(model_name: str, variant: str, args: argparse.Namespace) -> Measurement:
    cmd = [sys.executable, "-m", "benchmarks.client_step", "--one", model_name, variant, "--steps", str(args.steps),
           "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_DIR)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name}/{variant} failed:\n{done.stderr[-3000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def table(results: list[Measurement]) -> str:
    """One row per variant: tokens/s, s/step and peak memory, each next to its baseline's (:data:`BASELINE`)."""
    by_key = {(r.model, r.variant): r for r in results}
    rows = []
    for r in results:
        _, batch, length = MODELS[r.model]
        base = by_key.get((r.model, BASELINE.get(r.variant, "")))
        ratio = f"{r.seconds_per_step / base.seconds_per_step:.2f}x vs {base.variant}" if base else ""
        mem = f"{r.peak_mib / base.peak_mib:.2f}x" if base and base.peak_mib > 0 else ""
        rows.append([r.model, r.variant, f"{batch * length / r.seconds_per_step:,.0f}", f"{r.seconds_per_step:.3f}",
                     ratio, f"{r.peak_mib:,.0f}", mem])
    return markdown_table(["model", "variant", "tokens/s", "s/step", "time ×", "peak MiB (process)", "memory ×"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"among {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed call (a round's local steps)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls; the median is reported")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        m = measure(args.one[0], args.one[1], args.steps, args.rounds, args.warmup, args.device)
        print(json.dumps(m.__dict__))
        return
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose among {', '.join(VARIANTS)}")
    print(f"start: {machine_line()}", flush=True)
    results = []
    for name in args.models.split(","):
        for variant in variants:
            results.append(in_subprocess(name, variant, args))
            print(f"{name}/{variant}: {results[-1].seconds_per_step:.3f} s/step", flush=True)
    print(f"end: {machine_line()}; device {args.device}, median of {args.rounds} calls of {args.steps} steps "
          f"after {args.warmup} warm-up steps")
    print(table(results))


if __name__ == "__main__":
    main()
