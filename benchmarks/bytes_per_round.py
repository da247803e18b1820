"""Bytes per round per strategy: metrics.jsonl ``bytes_up`` / ``bytes_down`` vs each strategy's byte contract.

Every registered strategy declares exactly which arrays one client sends and receives per
round (``traffic`` in its math module, see :mod:`fedlora.strategies.registry`; float32, plus a
float64 coefficient vector with a weighted stack): r(d+k) per module for FedIT, r·d for FFA-LoRA
(B only), r² for Fed-SB (R only; B and A travel down once per node, with its first training
message; round 0 uploads each client's dense d×k gradients), for FLoRA r(d+k) up and the
previous round's merge (every client's factors) down, and
so on for every strategy in the registry. The table splits the contract into the LoRA payload
and the fully-trained extras (the classification head), and shows what Flower's count
(``ArrayRecord.count_bytes``: each array's ``.npy`` bytes, a 128-byte header plus the payload,
plus its key's length) adds per array. Each strategy runs in-process
(:func:`fedlora.runtime.inprocess.run_inprocess`) on all nodes for two rounds of one local
step; ``device`` is the run config's (``auto``: CUDA when present).

    python -m benchmarks bytes [--models tiny-bert,minilm] [--strategies all|fedavg,ffa,…] [--nodes 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import machine_line, markdown_table, read_metrics
from fedlora.adapters.lora import LORA_A, PEFT_PREFIX, adapter_state
from fedlora.run_config import full_defaults, load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.strategies.registry import names, spec_of
from fedlora.strategies.traffic import array_name, extras, payload_bytes
from fedlora.task import server_model

Shapes = dict[str, tuple[int, ...]]


def adapter_shapes(model_name: str) -> Shapes:
    """Shapes of the run's initial adapter (the server's own model)."""
    state = adapter_state(server_model(load_config({**full_defaults(), "model.name": model_name}), "cpu"))
    return {k: tuple(v.shape) for k, v in state.items()}


def payload(arrays: Shapes, adapter: Shapes) -> tuple[int, int]:
    """(adapter-factor bytes, extras bytes) of ``arrays`` as they travel; extras are the initial adapter's
    fully-trained tensors (the head), with or without peft's name prefix."""
    head = {k.removeprefix(PEFT_PREFIX) for k in extras(adapter)}
    sizes = {k: payload_bytes(k, s) for k, s in arrays.items()}
    extra = sum(b for k, b in sizes.items() if array_name(k).removeprefix(PEFT_PREFIX) in head)
    return sum(sizes.values()) - extra, extra


def measure(model: str, strategy: str, nodes: int, out: Path) -> list[dict]:
    run_inprocess({"model.name": model, "strategy": strategy, "num-server-rounds": 2, "local-steps": 1,
                   "batch-size": 4, "output-dir": str(out)}, num_nodes=nodes)
    return read_metrics(out)


def rows_for(model: str, strategy: str, records: list[dict], adapter: Shapes, nodes: int) -> list[list[object]]:
    traffic = spec_of(strategy).traffic_formula()
    rows = []
    for r in records:
        for direction in ("up", "down"):
            measured = int(r[f"bytes_{direction}"])
            arrays = traffic(direction, r["round"], adapter, nodes)
            lora, extra = (nodes * b for b in payload(arrays, adapter))
            if measured == 0 and not arrays:
                continue
            framing = measured - lora - extra
            count = nodes * len(arrays)
            rows.append([model, strategy, r["round"], direction, measured, lora, extra, framing, count,
                         f"{framing / count:.0f}" if count else "n/a"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-bert,minilm")
    parser.add_argument("--strategies", default="all", help="comma-separated names, or all registered (default)")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"start: {machine_line()}", flush=True)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="fedlora-bytes-bench-") as tmp:
        for model in args.models.split(","):
            adapter = adapter_shapes(model)
            print(f"{model}: {sum(k.endswith(LORA_A) for k in adapter)} LoRA modules, shapes "
                  f"{sorted(set(adapter.values()))}")
            for strategy in names() if args.strategies == "all" else args.strategies.split(","):
                records = measure(model, strategy, args.nodes, Path(tmp) / f"{model}-{strategy}")
                rows += rows_for(model, strategy, records, adapter, args.nodes)
    header = ["model", "strategy", "round", "dir", "measured B (Flower)", "contract B (LoRA f32)", "extras B (head f32)",
              "measured − payload", "arrays", "added per array B"]
    print(f"{args.nodes} clients, all sampled; bytes summed over clients")
    print(markdown_table(header, rows))
    print(f"end: {machine_line()}")


if __name__ == "__main__":
    main()
