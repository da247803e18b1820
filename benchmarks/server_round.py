"""The server's whole training round on the same replies: fedlora's path vs Flower's built-in FedAvg, at LLM shapes.

Replies are real Flower Messages whose ArrayRecords hold each strategy's exact upload (its
byte contract, :mod:`fedlora.strategies.registry`) at Llama-2-7B shapes: the q_proj and v_proj
of ``--layers`` layers, d = k = 4096, LoRA rank r, K clients, float32. For each registered
strategy, on the same replies:

* **fedlora** — what :meth:`fedlora.server.rounds.RoundLoop.aggregate_round` runs once a
  round's replies are in (unpack and validate every reply, bound each client's influence,
  the strategy's ``aggregate`` with ``agg_error`` every round or with it off —
  ``metrics.agg-error-every = 0`` —, the round's metrics), under the server's BLAS thread
  limit (``FEDLORA_SERVER_THREADS``, default 1), and packing the next round's download;
* **Flower FedAvg** — ``flwr.serverapp.strategy.FedAvg().aggregate_train`` on the same replies
  (unpack, check consistency, weighted average, pack): what a user would pick instead;
* **one pass** — reading every reply's payload once (a float32 sum over each array's bytes):
  the memory-bandwidth floor of anything that looks at every input.

Times are the median of ``--repeats`` rounds that run every case in turn (fedlora on a fresh
copy of the server made before the clock starts), after one untimed warm-up round; each ratio
is the median of the ratios taken within a round (:func:`paired_ratio`); memory is
the tracemalloc peak of one more run above what existed before it (replies and the server's
own state included in neither; fedlora's is the larger of agg_error on and off). Flower's
per-round INFO lines are silenced.
A second table grows K and r for FedAvg on 2 modules, with ``agg_error`` off and on.

    python -m benchmarks server [--layers 4] [--clients 10] [--rank 16] [--repeats 3] [--strategies all|…]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.common import machine_line, markdown_table
from fedlora.adapters.lora import LORA_A, LORA_B, PEFT_PREFIX
from fedlora.adapters.lorasb import LORASB_A, LORASB_B
from fedlora.adapters.transport import record_bytes, to_record
from fedlora.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID, RANK, SERVER_ROUND, TRAIN_LOSS
from fedlora.run_config import full_defaults, load_config
from fedlora.server.round import Round
from fedlora.server.rounds import RoundLoop, server_math_threads
from fedlora.strategies.registry import names, spec_of
from fedlora.strategies.traffic import array_name

MiB = 2**20
D = K_IN = 4096
ROUND = 2


def adapter_shapes(layers: int, rank: int) -> dict[str, tuple[int, ...]]:
    """The peft state shapes of LoRA on q_proj and v_proj of ``layers`` Llama-2-7B layers (no head)."""
    shapes = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            module = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{proj}"
            shapes[module + LORA_A], shapes[module + LORA_B] = (rank, K_IN), (D, rank)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Plausible trained values: A ~ N(0, 1/k), everything else ~ N(0, 0.01²)."""
    return {k: (rng.standard_normal(s, dtype=np.float32) * (K_IN ** -0.5 if k.endswith(LORA_A) else 0.01))
            for k, s in shapes.items()}


def replies_for(strategy: str, adapter: dict[str, tuple[int, ...]], clients: int, rank: int,
                seed: int = 0) -> tuple[list[Message], list[Message]]:
    """(messages, replies): one reply per client carrying exactly the strategy's round-2 upload."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    upload = {array_name(k): s for k, s in spec_of(strategy).traffic_formula()("up", ROUND, adapter, clients).items()}
    rng = np.random.default_rng(seed)
    messages, replies = [], []
    for node in range(1, clients + 1):
        message = Message(RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: ROUND})}), dst_node_id=node,
                          message_type=MessageType.TRAIN)
        message.metadata.__dict__["_message_id"] = f"m{node}"
        metrics = MetricRecord({NUM_EXAMPLES: int(rng.integers(100, 1000)), PARTITION_ID: node - 1, RANK: rank,
                                TRAIN_LOSS: 1.0})
        reply = Message(RecordDict({ARRAYS: to_record(random_state(upload, rng)), METRICS: metrics}), reply_to=message)
        messages.append(message)
        replies.append(reply)
    return messages, replies


def server_loop(strategy: str, adapter: dict[str, tuple[int, ...]], rank: int, agg_error_every: int) -> RoundLoop:
    """A RoundLoop around the strategy's server part, in the state it has before round 2."""
    cfg = load_config({**full_defaults(), "strategy": strategy, "lora.rank": rank, "lora.alpha": 2 * rank,
                       "metrics.agg-error-every": agg_error_every})
    rng = np.random.default_rng(1)
    initial = random_state(adapter, rng)
    server = spec_of(strategy).server_class()(cfg, initial)
    if strategy == "fedsb":  # its fixed factors come from the setup phase; stand-ins of the right shapes
        plain = {k.removeprefix(PEFT_PREFIX): v for k, v in initial.items()}
        server.frozen = {}
        for key, value in plain.items():
            module = key[: -len(LORA_A)] if key.endswith(LORA_A) else key[: -len(LORA_B)]
            server.frozen[module + (LORASB_A if key.endswith(LORA_A) else LORASB_B)] = value
        server.state = random_state({f"{m[: -len(LORASB_A)]}.lorasb_R.weight": (rank, rank)
                                     for m in server.frozen if m.endswith(LORASB_A)}, rng)
    return RoundLoop(server, cfg, evaluate=dict, reporter=None, checkpoint=None)  # type: ignore[arg-type]


def fedlora_round(loop: RoundLoop, messages: list[Message], replies: list[Message]) -> dict:
    """What the server does with a round's replies (``RoundLoop.aggregate_round``, under its BLAS thread limit),
    then packs the next round's download for a node."""
    nodes = [m.metadata.dst_node_id for m in messages]
    sent = Round(ROUND, nodes, len(nodes), 0, time.monotonic(),
                 destinations={m.metadata.message_id: m.metadata.dst_node_id for m in messages})
    with server_math_threads():
        record = loop.aggregate_round(ROUND, nodes, sent, replies)
        if record.get("num_clients") != len(replies):
            raise RuntimeError(f"replies rejected: {record.get('rejected')}")
        record["bytes_down"] = sum(record_bytes(to_record(s)) for s in loop.strategy.downloads(ROUND + 1, 1).values())
    return record


def flower_round(replies: list[Message]) -> None:
    FedAvg().aggregate_train(ROUND, replies)


def one_pass(replies: list[Message]) -> float:
    total = 0.0
    for reply in replies:
        for array in reply.content[ARRAYS].values():
            n = int(np.prod(array.shape))
            total += float(np.frombuffer(array.data, np.float32, count=n, offset=len(array.data) - 4 * n).sum())
    return total


Timed = tuple[Callable[[object], object], Callable[[], object]]


def interleaved(cases: dict[str, Timed], repeats: int) -> dict[str, list[float]]:
    """Seconds of each case's ``fn(setup())`` in each of ``repeats`` rounds that run every case in turn (after one
    untimed warm-up round), so a slow spell of the machine hits every case of a round alike; ``setup`` is not timed."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(repeats + 1):
        for name, (fn, setup) in cases.items():
            argument = setup()
            start = time.perf_counter()
            fn(argument)
            if repeat:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: list[float], *denominator: list[float]) -> float:
    """The median over rounds of ``numerator / sum(denominator)`` taken within each round (cases of one round ran
    back to back): steadier than a ratio of medians when the machine's speed drifts between rounds."""
    return statistics.median(n / sum(d) for n, *d in zip(numerator, *denominator))


def traced_peak(fn: Callable[[object], object], setup: Callable[[], object] = lambda: None) -> float:
    """Tracemalloc peak (MiB) of one ``fn(setup())`` above what existed before it; ``setup`` is not traced."""
    argument = setup()
    tracemalloc.start()
    fn(argument)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / MiB


def fedlora_case(name: str, adapter: dict[str, tuple[int, ...]], rank: int, every: int, messages: list[Message],
                 replies: list[Message]) -> Timed:
    """fedlora's round on a fresh copy of the server in its round-2 state (the copy is made before the clock starts)."""
    base = server_loop(name, adapter, rank, every)
    return (lambda loop: fedlora_round(loop, messages, replies)), (lambda: copy.deepcopy(base))


def strategy_rows(strategies: list[str], layers: int, clients: int, rank: int, repeats: int) -> list[list[object]]:
    adapter = adapter_shapes(layers, rank)
    rows = []
    for name in strategies:
        messages, replies = replies_for(name, adapter, clients, rank)
        cases = {"flower": ((lambda _: flower_round(replies)), lambda: None),
                 "pass": ((lambda _: one_pass(replies)), lambda: None),
                 "on": fedlora_case(name, adapter, rank, 1, messages, replies),
                 "off": fedlora_case(name, adapter, rank, 0, messages, replies)}
        times = interleaved(cases, repeats)
        flower_s, pass_s = statistics.median(times["flower"]), statistics.median(times["pass"])
        cells = []
        for every in ("on", "off"):
            cells += [f"{1e3 * statistics.median(times[every]):,.0f}", f"{paired_ratio(times[every], times['flower']):.2f}x",
                      f"{paired_ratio(times[every], times['flower'], times['pass']):.2f}x"]
        peak = max(traced_peak(*cases["on"]), traced_peak(*cases["off"]))
        flower_mib = traced_peak(*cases["flower"])
        rows.append([name, *cells, f"{1e3 * flower_s:,.0f}", f"{1e3 * pass_s:,.0f}", f"{peak:,.0f}", f"{flower_mib:,.0f}",
                     f"{peak / flower_mib:.2f}x"])
        print(f"{name}: done", flush=True)
    return rows


def growth_rows(repeats: int) -> list[list[object]]:
    rows = []
    for clients in (2, 10, 50):
        for rank in (4, 16, 64):
            adapter = adapter_shapes(1, rank)
            messages, replies = replies_for("fedavg", adapter, clients, rank)
            times = interleaved({"off": fedlora_case("fedavg", adapter, rank, 0, messages, replies),
                                   "on": fedlora_case("fedavg", adapter, rank, 1, messages, replies),
                                   "flower": ((lambda _: flower_round(replies)), lambda: None)}, repeats)
            rows.append([clients, rank, *(f"{1e3 * statistics.median(times[case]):,.1f}" for case in ("off", "on", "flower"))])
            print(f"growth K={clients} r={rank}: done", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="Llama-2-7B layers whose q_proj and v_proj are adapted")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategies", default="all", help="comma-separated names, or all registered (default)")
    parser.add_argument("--no-growth", action="store_true", help="skip the K × r growth table")
    args = parser.parse_args(argv)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        report(args)
    finally:
        flwr_logger.setLevel(level)


def report(args: argparse.Namespace) -> None:
    """Print the per-strategy table (and the growth table unless ``--no-growth``) for the parsed arguments."""
    print(f"start: {machine_line()}", flush=True)
    strategies = names() if args.strategies == "all" else args.strategies.split(",")
    rows = strategy_rows(strategies, args.layers, args.clients, args.rank, args.repeats)
    print(f"{2 * args.layers} modules (q_proj, v_proj of {args.layers} layers, d = k = {D}), r = {args.rank}, "
          f"K = {args.clients} clients, float32, median of {args.repeats} interleaved rounds; ratios (the median of each round's "
          f"own ratio) against Flower's FedAvg on the same replies, and against FedAvg plus one pass over the inputs")
    print(markdown_table(
        ["strategy", "fedlora ms (agg_error on)", "× Flower", "× Flower + pass", "fedlora ms (agg_error off)", "× Flower",
         "× Flower + pass", "Flower FedAvg ms", "one pass ms", "fedlora peak MiB", "Flower peak MiB", "peak ×"], rows))
    if not args.no_growth:
        print("FedAvg, 2 modules (d = k = 4096): ms per round as K and r grow (agg_error off, on) next to Flower's FedAvg")
        print(markdown_table(["K", "r", "fedlora ms (off)", "fedlora ms (on)", "Flower FedAvg ms"], growth_rows(args.repeats)))
    print(f"end: {machine_line()}")


if __name__ == "__main__":
    main()
