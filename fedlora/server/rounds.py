"""The one round loop of every fedlora run: it moves Messages, the strategy does the math.

A round is a :class:`Round` value: what was sent to whom, what came back, what was
rejected and why, and the bytes both ways. :class:`RoundLoop` owns everything around the
strategy — sampling, messages, reply validation, weights, evaluation, metrics and the
checkpoint — so a strategy's server part (:class:`~fedlora.server.strategy.ServerStrategy`)
only says what to send, what to expect back, and how to aggregate it.

Round 0 runs the strategy's setup phase (if it has one) and evaluates the initial model;
rounds 1..N train, aggregate, evaluate and report. A round with fewer than ``min-clients``
valid replies is skipped: the global state stays, and its record says why (``skipped``)
next to the failures (``rejected``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import secrets
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from threadpoolctl import ThreadpoolController

from fedlora.adapters.transport import from_record, record_bytes, to_record
from fedlora.config import RunConfig
from fedlora.protocol import (
    ARRAYS, CONFIG, EPSILON, METRICS, PARTITION_ID, REFUSED, RUN_KEY, SERVER_ROUND, SIMULATED_DELAY, STATUS, TRAIN_LOSS,
)
from fedlora.adapters.state import AdapterState
from fedlora.server.checkpoint import Checkpoint, write_checkpoint
from fedlora.server.influence import capped_shares, norm_ratios, scaled_update
from fedlora.server.progress import PROGRESS_SECONDS, ReplyProgress, error_reason, exchange_label
from fedlora.server.report import RoundReporter
from fedlora.server.round import ClientUpdate, Round, reply_record
from fedlora.server.strategy import ServerStrategy
from fedlora.server.validation import InvalidUpdate, Reference, Shapes, num_examples_of, validate_upload
from fedlora.strategies.common import client_weights

Expected = Callable[[ClientUpdate], Shapes]
#: seconds between pulls for the replies of a round (Flower's Grid.send_and_receive waits 3 s between pulls)
REPLY_POLL_SECONDS = 0.25
#: BLAS threads of the server's math (unpacking, validation, bounds, aggregation, agg_error)
SERVER_THREADS_ENV = "FEDLORA_SERVER_THREADS"


def server_threads() -> int:
    """``$FEDLORA_SERVER_THREADS``, default 1: the server's matrix products are small and many, and a BLAS pool
    that spins on cores the clients, Ray or another process are using costs far more than it saves (measured:
    one ``agg_error`` call 2.2–4.5 s with the default pool on a loaded 2-core machine, 0.02–0.04 s with one
    thread). A dedicated server host can raise it."""
    raw = os.environ.get(SERVER_THREADS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{SERVER_THREADS_ENV}={raw!r} is not a positive integer")
    return int(raw)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The process's BLAS/OpenMP libraries, found once (finding them reads the loaded libraries: ~1.5 ms)."""
    return ThreadpoolController()


def server_math_threads() -> contextlib.AbstractContextManager[object]:
    """A context in which the BLAS pool uses :func:`server_threads` threads (restored on exit)."""
    return _blas_controller().limit(limits=server_threads(), user_api="blas")


class RoundLoop:
    """Runs a strategy over a Grid: ``evaluate`` scores the current global model; every round's record goes
    to ``reporter`` (console line, metrics.jsonl), then the checkpoint is written to ``checkpoint``."""

    def __init__(self, strategy: ServerStrategy, cfg: RunConfig, evaluate: Callable[[], dict[str, float]],
                 reporter: RoundReporter, checkpoint: Path) -> None:
        self.strategy = strategy
        self.cfg = cfg
        self.evaluate = evaluate
        self.reporter = reporter
        self.checkpoint = checkpoint
        self.rng = random.Random(cfg.seed)
        self.num_nodes = 0
        #: names this logical run for the nodes' on-disk state; a resumed run keeps it (see :meth:`restore`)
        self.run_key = secrets.token_hex(8)

    # ----- checkpoint ----------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The strategy's arrays and values, plus the sampling RNG, the node count and the run key."""
        arrays, values = self.strategy.checkpoint_state()
        version, internal, gauss = self.rng.getstate()
        return arrays, {**values, "rng": [version, list(internal), gauss], "num_nodes": self.num_nodes,
                        "run_key": self.run_key}

    def restore(self, arrays: dict[str, np.ndarray], values: dict[str, Any]) -> None:
        """Continue after the round whose :meth:`checkpoint_state` wrote ``arrays`` and ``values``."""
        self.strategy.restore_state(arrays, values)
        version, internal, gauss = values["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.num_nodes = int(values["num_nodes"])
        self.run_key = str(values["run_key"])

    # ----- one exchange ------------------------------------------------------------------
    def sample(self, grid: Grid, fraction: float) -> list[int]:
        """``fraction`` of the connected nodes (at least one), waiting up to round-timeout for any to connect
        (saying so on the console every :data:`~fedlora.server.progress.PROGRESS_SECONDS`)."""
        started = time.monotonic()
        deadline = started + self.cfg.round_timeout
        said = started
        while not (nodes := sorted(grid.get_node_ids())) and time.monotonic() < deadline:
            if time.monotonic() - said >= PROGRESS_SECONDS:
                said = time.monotonic()
                print(f"[fedlora] no client connected after {said - started:.0f} s; waiting up to round-timeout = "
                      f"{self.cfg.round_timeout:g} s", flush=True)
            time.sleep(1)
        if not nodes:
            return []
        self.num_nodes = len(nodes)
        k = max(1, int(round(fraction * len(nodes))))
        return sorted(self.rng.sample(nodes, k))

    def send(self, grid: Grid, number: int, nodes: list[int], message_type: str,
             extra_config: dict[str, int | float | str] | None = None) -> tuple[Round, list[Message]]:
        """One message per node (its downloads and the round's config), sent and answered within round-timeout."""
        config = {SERVER_ROUND: number, RUN_KEY: self.run_key, **self.strategy.client_config(number),
                  **(extra_config or {})}
        messages, total = [], 0
        # a state sent to many nodes is packed once (records are only read); holding the state keeps its id unique
        packed: dict[int, tuple[AdapterState, ArrayRecord]] = {}
        for node in nodes:
            records = {}
            for name, state in self.strategy.downloads(number, node).items():
                if id(state) not in packed:
                    packed[id(state)] = (state, to_record(state))
                records[name] = packed[id(state)][1]
            total += sum(record_bytes(r) for r in records.values())
            content = RecordDict({**records, CONFIG: ConfigRecord(dict(config))})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        sent = Round(number, nodes, self.num_nodes, total, time.monotonic())
        replies = self.exchange(grid, messages)
        sent.destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return sent, replies

    def exchange(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Push ``messages`` and pull their replies every :data:`REPLY_POLL_SECONDS` until all came or round-timeout;
        each reply, and who is still out, goes to the console as it happens (:mod:`fedlora.server.progress`)."""
        if not messages:
            return []
        pending = dict.fromkeys(grid.push_messages(messages))  # an ordered set: pulls in push order
        started = time.monotonic()
        deadline = started + self.cfg.round_timeout
        progress = ReplyProgress(exchange_label(messages[0]), {m.metadata.message_id: m.metadata.dst_node_id
                                                               for m in messages}, started, self.cfg.round_timeout,
                                 self.cfg.local_steps)
        replies: list[Message] = []
        while pending:
            arrived = list(grid.pull_messages(list(pending)))
            replies += arrived
            for reply in arrived:
                pending.pop(reply.metadata.reply_to_message_id, None)
                progress.replied(reply, time.monotonic())
            if not pending or time.monotonic() >= deadline:
                break
            progress.waiting(time.monotonic())
            time.sleep(REPLY_POLL_SECONDS)
        return replies

    def _lateness(self, sent: Round, reply: Message) -> str | None:
        """Why a reply counts as late: it reports a simulated delay that puts it past round-timeout."""
        metrics = reply_record(reply.content, METRICS, MetricRecord)
        delay = float(metrics.get(SIMULATED_DELAY, 0.0)) if metrics is not None else 0.0
        arrived = time.monotonic() - sent.sent_at + delay
        if delay and arrived > self.cfg.round_timeout:
            return f"reply arrived past round-timeout = {self.cfg.round_timeout:g} s (simulated delay {delay:g} s; late, discarded)"
        return None

    def _parse(self, sent: Round, reply: Message, expected: Expected, reference: Reference) -> ClientUpdate:
        """The reply as a validated :class:`ClientUpdate`; :class:`InvalidUpdate` says why it is not usable."""
        record, arrays = reply_record(reply.content, METRICS, MetricRecord), reply_record(reply.content, ARRAYS, ArrayRecord)
        if record is None or arrays is None:
            raise InvalidUpdate(f"reply lacks its {METRICS!r} or {ARRAYS!r} record")
        metrics = dict(record)
        update = ClientUpdate(
            node_id=sent.node_of(reply),
            partition_id=int(metrics.get(PARTITION_ID, -1)),
            state=from_record(arrays),
            num_examples=num_examples_of(metrics),
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        )
        def observe(key: str, tensor: np.ndarray) -> None:
            made = self.strategy.observe_upload(key, tensor)
            if made is not None:
                update.observed[key] = made

        update.update_norm = float(np.sqrt(validate_upload(update.state, expected(update), self.cfg.validation.max_rms,
                                                           reference, observe)))
        return update

    def collect(self, sent: Round, replies: Iterable[Message], expected: Expected, reference: AdapterState) -> Round:
        """Fill ``sent`` with the valid updates, their bytes and every failure, in node order (not arrival order);
        each update's norm is measured against ``reference``, the state the clients started from."""
        replies = sorted(replies, key=sent.node_of)
        started_from = Reference(reference)
        for reply in replies:
            node = sent.node_of(reply)
            if reply.has_error():
                sent.rejected.append(f"node {node}: {error_reason(reply.error.reason)}")
                continue
            status, metrics = reply_record(reply.content, STATUS, ConfigRecord), reply_record(reply.content, METRICS, MetricRecord)
            if status is not None and REFUSED in status:
                sent.rejected.append(f"node {node} refused: {status[REFUSED]}")
                sent.refused_epsilons.append(float(metrics.get(EPSILON, 0.0)) if metrics is not None else 0.0)
                continue
            source = f"node {node}"
            if metrics is not None and PARTITION_ID in metrics:
                source += f" (partition {int(metrics[PARTITION_ID])})"
            late = self._lateness(sent, reply)
            if late:
                sent.rejected.append(f"{source}: {late}")
                continue
            try:
                update = self._parse(sent, reply, expected, started_from)
            except InvalidUpdate as err:
                sent.rejected.append(f"{source} rejected: {err}")
                continue
            sent.bytes_up += record_bytes(reply.content[ARRAYS])
            sent.updates.append(update)
        sent.updates.sort(key=lambda u: (u.partition_id, u.node_id))  # fixed summation order: reproducible
        answered = {sent.node_of(r) for r in replies}
        sent.rejected += [f"node {n}: no reply within round-timeout = {self.cfg.round_timeout:g} s (raise "
                          f"round-timeout to wait longer for slow clients)"
                          for n in sorted(set(sent.destinations.values()) - answered)]
        return sent

    def bounded_weights(self, done: Round, reference: AdapterState) -> np.ndarray:
        """Bound the round's updates (norm relative to the others', share cap), noting each bound in ``done.clipped``;
        the weights p_k of ``done.updates`` after the cap (:mod:`fedlora.server.influence`)."""
        bounds = self.cfg.validation
        if bounds.max_norm_ratio > 0 and len(done.updates) > 1:
            norms = [u.update_norm for u in done.updates]
            for update, norm, ratio in zip(done.updates, norms, norm_ratios(norms)):
                if ratio > bounds.max_norm_ratio:
                    update.state = scaled_update(update.state, reference, bounds.max_norm_ratio / ratio)
                    update.observed.clear()
                    done.clipped.append(f"node {update.node_id} (partition {update.partition_id}): update norm {norm:.3g} "
                                        f"is {ratio:.3g}× the other clients' median; scaled down to "
                                        f"validation.max-norm-ratio = {bounds.max_norm_ratio:g}×")
        weights = client_weights([u.num_examples for u in done.updates], self.cfg.weighting)
        capped = capped_shares(weights, bounds.max_share)
        for update, before, after in zip(done.updates, weights, capped):
            if after < before - 1e-12:
                done.clipped.append(f"node {update.node_id} (partition {update.partition_id}): weight {before:.3g} capped "
                                    f"at {after:.3g} (validation.max-share = {bounds.max_share:g})")
        return capped

    # ----- round 0 and a training round ---------------------------------------------------
    def setup(self, grid: Grid) -> dict[str, float]:
        """The strategy's setup phase, if any: its uploads averaged (one linear release) into its initial state."""
        config = self.strategy.setup_config()
        if config is None:
            return {"bytes_up": 0.0, "bytes_down": 0.0}
        nodes = self.sample(grid, self.cfg.fraction_train)
        sent, replies = self.send(grid, 0, nodes, MessageType.TRAIN, config)
        with server_math_threads():
            return self._finish_setup(sent, replies)

    def _finish_setup(self, sent: Round, replies: list[Message]) -> dict[str, float]:
        done = self.collect(sent, replies, self.strategy.setup_expected_upload, {})
        if not done.updates:
            raise RuntimeError(f"the setup phase of strategy {self.cfg.strategy!r} received no valid reply "
                               f"({'; '.join(done.rejected) or 'no node connected'})")
        average, release = self.strategy.setup_average(done, self.bounded_weights(done, {}))
        self.strategy.finish_setup(average)
        metrics = {k: v for k, v in done.metrics().items() if k != "num_sampled"}
        return {**metrics, **release, **({"clipped": done.clipped} if done.clipped else {})}

    def train_round(self, grid: Grid, number: int) -> dict[str, Any]:
        """Send, collect, aggregate one training round; its record (without evaluation)."""
        nodes = self.sample(grid, self.cfg.fraction_train)
        sent, replies = self.send(grid, number, nodes, MessageType.TRAIN)
        with server_math_threads():
            return self.aggregate_round(number, nodes, sent, replies)

    def aggregate_round(self, number: int, nodes: list[int], sent: Round, replies: list[Message]) -> dict[str, Any]:
        """Everything between a training round's replies and its record: unpack and validate, bound, aggregate."""
        done = self.collect(sent, replies, lambda update: self.strategy.expected_upload(number, update),
                            self.strategy.state)
        self.strategy.delivered(number, [u.node_id for u in done.updates])
        record: dict[str, Any] = done.metrics()
        if done.rejected:
            record["rejected"] = done.rejected
        if len(done.updates) < self.cfg.min_clients:
            record["skipped"] = (f"{len(done.updates)} valid replies < min-clients = {self.cfg.min_clients}"
                                 if nodes else f"no node connected within round-timeout = {self.cfg.round_timeout:g} s")
            log(WARNING, "round %d skipped, global state unchanged: %s", number, record["skipped"])
            self.strategy.skipped(number)
            return record
        weights = self.bounded_weights(done, self.strategy.state)
        if done.clipped:
            record["clipped"] = done.clipped
        self.strategy.state, extra = self.strategy.aggregate(done, weights)
        record.update(extra)
        record[TRAIN_LOSS] = float(sum(p * u.metrics.get(TRAIN_LOSS, 0.0) for p, u in zip(weights, done.updates)))
        return record

    def client_evaluation(self, grid: Grid, number: int) -> dict[str, float]:
        """``client_eval_*``: the global model evaluated by ``fraction-evaluate`` of the clients on their data."""
        if self.cfg.fraction_evaluate == 0:
            return {}
        sent, replies = self.send(grid, number, self.sample(grid, self.cfg.fraction_evaluate), MessageType.EVALUATE)
        results = [dict(r.content[METRICS]) for r in replies if not r.has_error()]
        if not results:
            return {}
        weights = client_weights([num_examples_of(m) for m in results], self.cfg.weighting)
        keys = [k for k in results[0] if k.startswith("eval_")]
        return {f"client_{k}": float(sum(p * m[k] for p, m in zip(weights, results))) for k in keys}

    def finish(self, number: int, record: dict[str, Any]) -> None:
        """Record a round (metrics first), then checkpoint the state it left."""
        self.reporter.on_round(number, record)
        write_checkpoint(self.checkpoint, Checkpoint(number, self.cfg.to_flat(), *self.checkpoint_state()))

    def run(self, grid: Grid, first_round: int = 0) -> None:
        """Round 0 (setup + evaluation of the initial model) unless resuming, then rounds up to num-server-rounds."""
        log(INFO, "fedlora strategy %s: fraction-train=%s weighting=%s", self.cfg.strategy, self.cfg.fraction_train,
            self.cfg.weighting)
        if first_round == 0:
            self.finish(0, {**self.setup(grid), **self.evaluate()})
        aggregated = 0
        first = max(first_round, 1)
        for number in range(first, self.cfg.num_server_rounds + 1):
            started = time.monotonic()
            record = self.train_round(grid, number)
            aggregated += "skipped" not in record
            record.update(self.client_evaluation(grid, number))
            record.update(self.evaluate())
            record["round_seconds"] = time.monotonic() - started
            self.finish(number, record)
        if first <= self.cfg.num_server_rounds and not aggregated:
            log(WARNING, "rounds %d..%d aggregated no client update: the global adapter did not change in them",
                first, self.cfg.num_server_rounds)
