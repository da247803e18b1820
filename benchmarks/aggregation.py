"""Server aggregation on a 7B-shaped adapter: time and peak memory per strategy vs a plain reference.

Synthetic float32 LoRA factors at Llama-2-7B shapes (per layer q, k, v, o: 4096×4096;
gate, up: 11008×4096; down: 4096×11008, as d×k = out×in), rank r, K clients with random
weights p_k. Each fedlora function runs next to its plain reference
(:mod:`benchmarks.aggregation_naive`) or to "one pass" over its inputs (summing every input
array once), on the same inputs. Peak memory is what ``tracemalloc`` saw allocated during the call
(numpy reports its buffers to it) on top of the inputs, split into what the call returns
(output) and what it freed again (temporaries). Dense-module units are the largest module's d×k.
The linear averages (FedAvg, FFA-LoRA, Fed-SB, FLoRA's stacking) are timed as the best of
three untraced calls. The groups with a dense reference cost the same per layer and hold at
most one layer's modules at a time, so they run once on the first ``--dense-layers`` layers
of the same inputs: LoRA-FAIR (traced; its overhead is negligible next to allocations of
hundreds of MiB) and FLoRA's merge of the stacked update into the base weights — the
server's :func:`fedlora.adapters.lora.merge_into_base`, torch on float32 weights — whose
peak is sampled from the resident set size instead, since tracemalloc does not see torch.
So do the ``agg_error`` diagnostics that every strategy's ``aggregate_updates`` computes
each round (factored: no dense ΔW, see :func:`fedlora.strategies.common.frobenius`). The
server's aggregation is numpy, so this suite runs on the CPU whether or not CUDA is present.

    python -m benchmarks aggregation [--layers 32] [--dense-layers 1] [--clients 10] [--rank 16]
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import psutil
import torch

from benchmarks.aggregation_naive import naive_average, naive_lorafair, naive_merge, one_pass
from benchmarks.common import machine_line, markdown_table
from fedlora.adapters.lora import LORA_A, LORA_B, merge_into_base
from fedlora.adapters.lorasb import LORASB_A, LORASB_B, LORASB_R
from fedlora.adapters.state import AdapterState
from fedlora.strategies.fedavg.math import fedavg_error, fedavg_states
from fedlora.strategies.fedsb.math import aggregate_fedsb, fedsb_error
from fedlora.strategies.ffa.math import aggregate_ffa, ffa_error
from fedlora.strategies.flora.math import flora_error, stacked_state
from fedlora.strategies.lorafair.math import aggregate_lorafair

MiB = 2**20


@dataclass(frozen=True)
class Shapes:
    """A Llama-shaped stack of adapted linear layers."""

    layers: int
    hidden: int
    intermediate: int

    def modules(self) -> dict[str, tuple[int, int]]:
        """``{module name: (d, k)}`` with d = out features and k = in features."""
        h, f = self.hidden, self.intermediate
        per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                     "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
        return {f"base_model.model.model.layers.{i}.{name}": dk for i in range(self.layers) for name, dk in per_layer.items()}

    def dense_bytes(self, itemsize: int) -> int:
        """Bytes of the largest module's dense d×k matrix."""
        return max(d * k for d, k in self.modules().values()) * itemsize


def lora_states(shapes: Shapes, clients: int, rank: int, rng: np.random.Generator) -> list[AdapterState]:
    """Per client, A (r×k) and B (d×r) of every module, float32 standard normal scaled down."""
    states = []
    for _ in range(clients):
        state = {}
        for module, (d, k) in shapes.modules().items():
            state[module + LORA_A] = rng.standard_normal((rank, k), dtype=np.float32) * np.float32(0.01)
            state[module + LORA_B] = rng.standard_normal((d, rank), dtype=np.float32) * np.float32(0.01)
        states.append(state)
    return states


def r_states(shapes: Shapes, clients: int, rank: int, rng: np.random.Generator) -> list[AdapterState]:
    """Per client, Fed-SB's r×r matrix R of every module."""
    return [{m + LORASB_R: rng.standard_normal((rank, rank), dtype=np.float32) for m in shapes.modules()}
            for _ in range(clients)]


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds: float
    input_bytes: int
    output_bytes: int
    temporary_bytes: int


class BaseWeights:
    """The base weights FLoRA merges into, as :func:`fedlora.adapters.lora.merge_into_base` reaches them
    (``get_submodule(module).base_layer.weight``): one float32 torch tensor per module, zeros."""

    def __init__(self, modules: dict[str, tuple[int, int]]) -> None:
        self.modules = {m: SimpleNamespace(base_layer=SimpleNamespace(weight=torch.zeros(d, k))) for m, (d, k) in modules.items()}

    def get_submodule(self, module: str) -> SimpleNamespace:
        return self.modules[module]


def resident_peak(fn: Callable[[], object], interval: float = 0.001) -> tuple[float, int]:
    """(seconds, peak resident bytes above the level at the start) of one call of ``fn``.

    Sampled from a thread every ``interval`` seconds: it sees torch's CPU allocations, which
    ``tracemalloc`` does not. Large buffers are mmap'd by the allocator, so they show in RSS
    while they live and leave it when freed.
    """
    process = psutil.Process()
    gc.collect()
    start_rss = process.memory_info().rss
    peak = start_rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, max(peak, process.memory_info().rss) - start_rss


def measure_resident(name: str, fn: Callable[[], object], input_bytes: int) -> Measurement:
    """One call; its peak resident memory above the start counts as temporaries (it returns nothing)."""
    seconds, peak = resident_peak(fn)
    return Measurement(name, seconds, input_bytes, 0, peak)


def measure(name: str, fn: Callable[[], object], input_bytes: int, repeats: int = 3) -> Measurement:
    """Memory from one call under tracemalloc; time from the best of ``repeats`` untraced calls (0: the traced one)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return Measurement(name, min(times, default=seconds), input_bytes, current, peak - current)


@dataclass(frozen=True)
class Group:
    """Measurements on the same inputs; ratios are taken against ``measurements[baseline]`` (None: no ratio)."""

    strategy: str
    measurements: list[Measurement]
    baseline: int | None = -1


def nbytes(states: list[AdapterState]) -> int:
    return sum(v.nbytes for s in states for v in s.values())


def first_layers(states: list[AdapterState], layers: int) -> list[AdapterState]:
    """Views of the tensors of layers 0..layers−1 (no copies)."""
    prefixes = tuple(f"base_model.model.model.layers.{i}." for i in range(layers))
    return [{k: v for k, v in s.items() if k.startswith(prefixes)} for s in states]


def run(shapes: Shapes, dense_layers: int, clients: int, rank: int, lam: float,
        seed: int) -> list[Group]:
    """Groups of (fedlora function, plain reference or one pass) measured back to back on the same inputs."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(clients))
    scales = [2.0] * clients
    states = lora_states(shapes, clients, rank, rng)
    b_only = [{k: v for k, v in s.items() if k.endswith(LORA_B)} for s in states]
    rs = r_states(shapes, clients, rank, rng)
    few, few_b, few_r = (first_layers(x, dense_layers) for x in (states, b_only, rs))
    frozen_A = {k: v for k, v in few[0].items() if k.endswith(LORA_A)}
    frozen_sb = {k.replace(suffix, sb): v for k, v in few[0].items()
                 for suffix, sb in ((LORA_A, LORASB_A), (LORA_B, LORASB_B)) if k.endswith(suffix)}
    few_stack = stacked_state(few, weights, scales)
    base = BaseWeights({m: dk for m, dk in shapes.modules().items() if m + LORA_A in few[0]})
    full, b_in, r_in = nbytes(states), nbytes(b_only), nbytes(rs)
    few_in, few_b_in, few_r_in = nbytes(few), nbytes(few_b), nbytes(few_r)
    return [
        Group("fedavg", [measure("fedavg_states", lambda: fedavg_states(states, weights), full),
                         measure("naive average", lambda: naive_average(states, weights), full),
                         measure("one pass", lambda: one_pass(states), full)]),
        Group("ffa", [measure("aggregate_ffa", lambda: aggregate_ffa(b_only, weights), b_in),
                      measure("naive average", lambda: naive_average(b_only, weights), b_in),
                      measure("one pass", lambda: one_pass(b_only), b_in)]),
        Group("fedsb", [measure("aggregate_fedsb", lambda: aggregate_fedsb(rs, weights), r_in),
                        measure("naive average", lambda: naive_average(rs, weights), r_in),
                        measure("one pass", lambda: one_pass(rs), r_in)]),
        Group("flora stack", [measure("stacked_state", lambda: stacked_state(states, weights, scales), full),
                              measure("one pass", lambda: one_pass(states), full)]),
        Group("flora merge (RSS)", [
            measure_resident("merge_into_base", lambda: merge_into_base(base, few_stack), nbytes([few_stack])),
            measure_resident("naive dense sum", lambda: naive_merge(base, few, weights, scales), few_in)]),
        Group("lorafair", [measure("aggregate_lorafair", lambda: aggregate_lorafair(few, weights, lam), few_in, 0),
                           measure("naive dense", lambda: naive_lorafair(few, weights, lam), few_in, 0)]),
        Group("agg_error", [measure("fedavg_error", lambda: fedavg_error(few, weights, 2.0), few_in, 0),
                            measure("ffa_error", lambda: ffa_error(few_b, weights, frozen_A, 2.0), few_b_in, 0),
                            measure("flora_error", lambda: flora_error(few_stack, few, weights, scales), few_in, 0),
                            measure("fedsb_error", lambda: fedsb_error(few_r, weights, frozen_sb, 2.0), few_r_in, 0)],
              baseline=None),
    ]


def report(groups: list[Group], shapes: Shapes) -> str:
    """One row per measurement: time relative to the group's baseline, memory in MiB and dense units."""
    dense32, dense64 = shapes.dense_bytes(4), shapes.dense_bytes(8)
    rows = []
    for group in groups:
        base = None if group.baseline is None else group.measurements[group.baseline]
        for m in group.measurements:
            rows.append([group.strategy, m.name, f"{m.seconds:.3f}", f"{m.seconds / base.seconds:.2f}×" if base else "—",
                         f"{m.input_bytes / MiB:.1f}", f"{m.output_bytes / MiB:.1f}", f"{m.temporary_bytes / MiB:.1f}",
                         f"{m.temporary_bytes / dense32:.2f} / {m.temporary_bytes / dense64:.2f}"])
    header = ["strategy", "function", "seconds", "× baseline (last row of group)", "inputs MiB", "output MiB",
              "temporaries MiB", "temporaries in dense d×k (f32 / f64)"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dense-layers", type=int, default=1, help="layers for FLoRA's merged ΔW and LoRA-FAIR")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lam", type=float, default=0.01, help="LoRA-FAIR's λ")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = Shapes(args.layers, args.hidden, args.intermediate)
    print(f"start: {machine_line()}", flush=True)
    groups = run(shapes, min(args.dense_layers, args.layers), args.clients, args.rank, args.lam, args.seed)
    print(f"{args.layers} layers ({min(args.dense_layers, args.layers)} for the dense groups) × 7 modules, d×k up to {args.intermediate}×{args.hidden}, r={args.rank}, "
          f"{args.clients} clients; largest dense module {shapes.dense_bytes(4) / MiB:.0f} MiB (f32)")
    print(report(groups, shapes))
    print(f"end: {machine_line()}")


if __name__ == "__main__":
    main()
