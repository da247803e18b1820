"""Bytes per round per strategy: metrics.jsonl ``bytes_up`` / ``bytes_down`` vs the analytic formulas.

Per LoRA module (B: d×r, A: r×k) and client, the float32 payload of one direction is
r(d+k) for FedAvg and LoRA-FAIR, rd for FFA-LoRA (B only), r² for Fed-SB (R only; B and A
travel down once per node, with its first training message), and for FLoRA r(d+k) up and,
down, the previous round's merge Σ_j r_j (d+k) (stacked rank Σ_j r_j over the clients).
Fed-SB's round 0 uploads each client's full d×k gradient of every module. Fully-trained
tensors (the classification head) travel in every message and are listed apart. Flower's
count (``ArrayRecord.count_bytes``) is each array's serialized ``.npy`` bytes (a 128-byte
header plus the payload) plus its key's length; the last columns show what it adds per array.
Each strategy runs in-process (:func:`fedlora.inprocess.run_inprocess`) on all nodes for
two rounds of one local step; ``device`` is the run config's (``auto``: CUDA when present).

    python -m benchmarks bytes [--models tiny-bert,minilm] [--strategies fedavg,ffa,flora,lorafair,fedsb] [--nodes 2]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import machine_line, markdown_table, read_metrics
from fedlora.adapters.lora import LORA_A, LORA_B, adapter_state, lora_modules
from fedlora.config import default_flat_config, parse_config
from fedlora.inprocess import run_inprocess
from fedlora.task import server_model

F32 = 4


@dataclass(frozen=True)
class Adapter:
    """What the formulas need from a model's adapter: (d, k, r) per LoRA module and the extras' sizes."""

    modules: list[tuple[int, int, int]]
    extra_floats: int
    extra_arrays: int

    def lora(self, per_module: str) -> int:
        """Σ over modules of 'rdk' (r(d+k)), 'rd', 'rr' (r²) or 'dk', in floats."""
        terms = {"rdk": lambda d, k, r: r * (d + k), "rd": lambda d, k, r: r * d,
                 "rr": lambda d, k, r: r * r, "dk": lambda d, k, r: d * k}[per_module]
        return sum(terms(d, k, r) for d, k, r in self.modules)


def adapter_shapes(model_name: str) -> Adapter:
    """Module shapes and extras of the run's initial adapter (the server's own model)."""
    state = adapter_state(server_model(parse_config({**default_flat_config(), "model.name": model_name}), "cpu"))
    modules = [(state[m + LORA_B].shape[0], state[m + LORA_A].shape[1], state[m + LORA_A].shape[0])
               for m in lora_modules(state)]
    extras = [v for k, v in state.items() if not k.endswith((LORA_A, LORA_B))]
    return Adapter(modules, sum(v.size for v in extras), len(extras))


def formula(strategy: str, direction: str, server_round: int, a: Adapter, nodes: int) -> tuple[int, int, int]:
    """(LoRA float32 payload bytes, extras payload bytes, arrays) summed over ``nodes`` clients."""
    m, extras = len(a.modules), (a.extra_floats * F32, a.extra_arrays)
    if server_round == 0:
        return (nodes * a.lora("dk") * F32, 0, nodes * m) if (strategy, direction) == ("fedsb", "up") else (0, 0, 0)
    if strategy == "fedsb":
        factors = a.lora("rdk") if direction == "down" and server_round == 1 else 0
        lora, arrays = a.lora("rr") + factors, m + (2 * m if factors else 0)
    elif strategy == "ffa":
        lora, arrays = a.lora("rd"), m
    elif strategy == "flora" and direction == "down":
        lora, arrays = (nodes * a.lora("rdk"), 2 * m) if server_round > 1 else (0, 0)
    else:
        lora, arrays = a.lora("rdk"), 2 * m
    return nodes * lora * F32, nodes * extras[0], nodes * (arrays + extras[1])


def measure(model: str, strategy: str, nodes: int, out: Path) -> list[dict]:
    run_inprocess({"model.name": model, "strategy": strategy, "num-server-rounds": 2, "local-steps": 1,
                   "batch-size": 4, "output-dir": str(out)}, num_nodes=nodes)
    return read_metrics(out)


def rows_for(model: str, strategy: str, records: list[dict], a: Adapter, nodes: int) -> list[list[object]]:
    rows = []
    for r in records:
        for direction in ("up", "down"):
            measured = int(r[f"bytes_{direction}"])
            lora, extras, arrays = formula(strategy, direction, r["round"], a, nodes)
            if measured == 0 and lora == 0 and extras == 0:
                continue
            framing = measured - lora - extras
            rows.append([model, strategy, r["round"], direction, measured, lora, extras, framing, arrays,
                         f"{framing / arrays:.0f}" if arrays else "n/a"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-bert,minilm")
    parser.add_argument("--strategies", default="fedavg,ffa,flora,lorafair,fedsb")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"start: {machine_line()}", flush=True)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="fedlora-bytes-bench-") as tmp:
        for model in args.models.split(","):
            a = adapter_shapes(model)
            print(f"{model}: {len(a.modules)} LoRA modules (d, k, r) = {sorted(set(a.modules))}, "
                  f"extras {a.extra_arrays} arrays / {a.extra_floats} floats")
            for strategy in args.strategies.split(","):
                records = measure(model, strategy, args.nodes, Path(tmp) / f"{model}-{strategy}")
                rows += rows_for(model, strategy, records, a, args.nodes)
    header = ["model", "strategy", "round", "dir", "measured B (Flower)", "formula B (LoRA f32)", "extras B (head f32)",
              "measured − payload", "arrays", "added per array B"]
    print(f"{args.nodes} clients, all sampled; bytes summed over clients")
    print(markdown_table(header, rows))
    print(f"end: {machine_line()}")


if __name__ == "__main__":
    main()
