"""The thin Flower shell every fedlora strategy shares.

It only moves Messages: sample clients, send them the global state, collect replies,
hand the parsed updates to the subclass's pure ``aggregate_updates`` and record what
travelled. A round: ``configure_train`` → clients train → ``aggregate_train`` → core math
→ new global state → server evaluation → ``on_round`` (metrics sink, checkpoint).
"""

from __future__ import annotations

import random
import secrets
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from peft import PeftModel

from fedlora.adapters.lora import load_adapter_state
from fedlora.adapters.transport import from_record, record_bytes, to_record
from fedlora.config import RunConfig
from fedlora.privacy.accounting import calibrate_noise
from fedlora.privacy.user_dp import noisy_average, user_level_epsilon
from fedlora.strategies.common import AdapterState, client_weights
from fedlora.strategies.validation import InvalidUpdate, Shapes, num_examples_of, validate_upload

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"
#: reply metric of simulated stragglers: seconds by which the reply arrives later than it did
SIMULATED_DELAY = "simulated-delay"


@dataclass
class ClientUpdate:
    """One client's parsed training reply."""

    node_id: int
    partition_id: int
    state: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def prefixed(prefix: str, state: AdapterState) -> AdapterState:
    """``state`` with every name prefixed (to keep several states apart in one checkpoint)."""
    return {prefix + k: v for k, v in state.items()}


def unprefixed(prefix: str, arrays: AdapterState, keys: Iterable[str]) -> AdapterState:
    """The state :func:`prefixed` stored under ``prefix``, in the order of ``keys``."""
    return {k: arrays[prefix + k] for k in keys}


class LoraStrategy(Strategy):
    """Shared plumbing; subclasses implement :meth:`aggregate_updates` (pure math)."""

    name = "base"

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        self.cfg = cfg
        self.state = initial_state
        self._rng = random.Random(cfg.seed)
        self._round_metrics: dict[str, float] = {}
        self._sent_at = time.monotonic()
        self._destinations: dict[str, int] = {}
        self._rejected: list[str] = []
        self.current_round = 0
        self._epsilons: list[float] = []
        self._num_nodes = 0
        self.user_dp_history: list[tuple[float, float, int]] = []
        #: names this logical run for the nodes' on-disk state; a resumed run keeps it (see :meth:`restore_state`)
        self.run_key = secrets.token_hex(8)

    # ----- what subclasses provide -------------------------------------------------
    @abstractmethod
    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        """New global state and strategy metrics (e.g. ``agg_error``) from this round's updates."""

    def download(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        """Array records a sampled node receives this round, by record name (default: the global adapter)."""
        return {ARRAYS: self.state}

    def client_config(self, server_round: int) -> dict[str, int | float | str]:
        """Extra per-round instructions for clients."""
        return {}

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        """Called with the nodes that replied successfully (they now hold this round's download)."""

    def expected_upload(self, update: ClientUpdate) -> Shapes:
        """Tensor name -> shape this client must upload (default: the whole global adapter).

        Raise :class:`~fedlora.strategies.validation.InvalidUpdate` when the reply itself
        says it cannot fit (e.g. an announced rank that is not configured).
        """
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def skip_round(self, server_round: int) -> None:
        """Called when a training round aggregated nothing; the global state stays as it was."""

    #: AdapterState attributes that the checkpoint keeps, besides ``state`` (e.g. fixed factors)
    checkpointed: tuple[str, ...] = ()

    def checkpoint_state(self) -> tuple[AdapterState, dict[str, Any]]:
        """Arrays (unique names) and JSON-able values that let :meth:`restore_state` continue this run.

        Written after every round: ``state`` and every attribute named in ``checkpointed``,
        each under its own name prefix, plus the sampling RNG, the user-level DP history and
        the run key. Subclasses with other server state extend both parts (call ``super()``).
        Node-specific bookkeeping (who received what) is not kept, since node ids change
        between runs: a resumed run treats every node as having received nothing.
        """
        arrays: AdapterState = {}
        values: dict[str, Any] = {}
        for name in ("state", *self.checkpointed):
            arrays.update(prefixed(f"{name}/", getattr(self, name)))
            values[f"{name}_keys"] = list(getattr(self, name))
        rng_version, rng_internal, rng_gauss = self._rng.getstate()
        values.update(rng=[rng_version, list(rng_internal), rng_gauss], num_nodes=self._num_nodes,
                      user_dp_history=[list(h) for h in self.user_dp_history], run_key=self.run_key)
        return arrays, values

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        """Continue from what :meth:`checkpoint_state` wrote (on a freshly built strategy)."""
        for name in ("state", *self.checkpointed):
            setattr(self, name, unprefixed(f"{name}/", arrays, values[f"{name}_keys"]))
        rng_version, rng_internal, rng_gauss = values["rng"]
        self._rng.setstate((rng_version, tuple(rng_internal), rng_gauss))
        self._num_nodes = int(values["num_nodes"])
        self.user_dp_history = [(float(s), float(q), int(n)) for s, q, n in values["user_dp_history"]]
        self.run_key = str(values["run_key"])

    def initialize(self, grid: Grid) -> dict[str, float]:
        """Work before round 0 (e.g. Fed-SB's gradient round); returns metrics for round 0."""
        return {}

    def apply_to(self, model: PeftModel) -> None:
        """Load the current global model into the server's adapted model (for evaluation)."""
        load_adapter_state(model, self.state)

    def save_final(self, model: PeftModel, path: Path) -> None:
        """Write the final global adapter where ``peft.PeftModel.from_pretrained`` loads it."""
        self.apply_to(model)
        model.save_pretrained(path)

    # ----- Flower Strategy interface ----------------------------------------------
    def summary(self) -> None:
        log(INFO, "fedlora strategy %s: fraction-train=%s weighting=%s", self.name, self.cfg.fraction_train, self.cfg.weighting)

    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        deadline = time.monotonic() + self.cfg.round_timeout
        while not (nodes := sorted(grid.get_node_ids())) and time.monotonic() < deadline:
            time.sleep(1)
        if not nodes:
            return []
        self._num_nodes = len(nodes)
        k = max(1, int(round(fraction * len(nodes))))
        return sorted(self._rng.sample(nodes, k))

    def _messages(self, nodes: list[int], server_round: int, message_type: str,
                  extra_config: dict | None = None) -> tuple[list[Message], int]:
        """One message per node with its download and the round's config; also the total array bytes."""
        config = {"server-round": server_round, "run-key": self.run_key, **self.client_config(server_round), **(extra_config or {})}
        messages, total = [], 0
        self._sent_at = time.monotonic()
        for node in nodes:
            records = {name: to_record(state) for name, state in self.download(server_round, node).items()}
            total += sum(record_bytes(r) for r in records.values())
            content = RecordDict({**records, CONFIG: ConfigRecord(dict(config))})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages, total

    def _send(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """``send_and_receive`` bounded by round-timeout; remembers where each message went (see :meth:`_node_of`)."""
        if not messages:
            return []
        replies = list(grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        self._destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return replies

    def _node_of(self, reply: Message) -> int:
        """The node a reply answers for: its message's destination (the SuperLink writes a dead node's error reply)."""
        return self._destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = self._sample(grid, self.cfg.fraction_train)
        messages, bytes_down = self._messages(nodes, server_round, MessageType.TRAIN)
        self._round_metrics = {"bytes_down": float(bytes_down), "num_sampled": float(len(nodes))}
        return messages

    def _parse(self, reply: Message) -> ClientUpdate:
        """The reply as a :class:`ClientUpdate`, validated; :class:`InvalidUpdate` says why it is not usable."""
        content = reply.content
        if METRICS not in content.metric_records or ARRAYS not in content.array_records:
            raise InvalidUpdate(f"reply lacks its {METRICS!r} or {ARRAYS!r} record")
        metrics = dict(content[METRICS])
        update = ClientUpdate(
            node_id=self._node_of(reply),
            partition_id=int(metrics.get("partition-id", -1)),
            state=from_record(content[ARRAYS]),
            num_examples=num_examples_of(metrics),
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        )
        validate_upload(update.state, self.expected_upload(update), self.cfg.validation.max_rms)
        return update

    def _lateness(self, reply: Message) -> str | None:
        """Why a reply counts as late: it reports a simulated delay that puts it past round-timeout."""
        delay = float(reply.content[METRICS].get(SIMULATED_DELAY, 0.0)) if METRICS in reply.content.metric_records else 0.0
        arrived = time.monotonic() - self._sent_at + delay
        if delay and arrived > self.cfg.round_timeout:
            return f"reply arrived past round-timeout = {self.cfg.round_timeout:g} s (simulated delay {delay:g} s; late, discarded)"
        return None

    def privacy_metrics(self, updates: list[ClientUpdate]) -> dict[str, float]:
        """``epsilon_max``/``epsilon_mean``: cumulative sample-level ε over the clients of the last
        :meth:`collect`, refusing ones included (empty without sample-level DP)."""
        epsilons = self._epsilons + [u.metrics["epsilon"] for u in updates if "epsilon" in u.metrics]
        return {"epsilon_max": max(epsilons), "epsilon_mean": float(np.mean(epsilons))} if epsilons else {}

    def collect(self, replies: Iterable[Message]) -> tuple[list[ClientUpdate], int, list[str]]:
        """Parse the replies that carry results, in a fixed order; also their array bytes and the failures."""
        self._epsilons = []  # ε of refusing clients, for privacy_metrics
        updates: list[ClientUpdate] = []
        bytes_up = 0
        failures = []
        for reply in replies:
            if reply.has_error():
                failures.append(f"node {self._node_of(reply)}: {reply.error.reason}")
                continue
            if STATUS in reply.content.config_records and "refused" in reply.content[STATUS]:
                failures.append(f"node {self._node_of(reply)} refused: {reply.content[STATUS]['refused']}")
                self._epsilons.append(float(reply.content[METRICS].get("epsilon", 0.0)))
                continue
            source = f"node {self._node_of(reply)}"
            if METRICS in reply.content.metric_records and "partition-id" in reply.content[METRICS]:
                source += f" (partition {int(reply.content[METRICS]['partition-id'])})"
            late = self._lateness(reply)
            if late:
                failures.append(f"{source}: {late}")
                continue
            try:
                update = self._parse(reply)
            except InvalidUpdate as err:
                failures.append(f"{source} rejected: {err}")
                continue
            bytes_up += record_bytes(reply.content[ARRAYS])
            updates.append(update)
        updates.sort(key=lambda u: (u.partition_id, u.node_id))  # fixed summation order: reproducible
        return updates, bytes_up, failures

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.current_round = server_round
        updates, bytes_up, self._rejected = self.collect(replies)
        self.delivered(server_round, [u.node_id for u in updates])
        metrics = dict(self._round_metrics, bytes_up=float(bytes_up), num_clients=float(len(updates)),
                       **self.privacy_metrics(updates))
        if len(updates) < self.cfg.min_clients:  # run() records and logs the skip
            return None, MetricRecord(metrics)
        weights = client_weights([u.num_examples for u in updates], self.cfg.weighting)
        if self.cfg.dp.mode == "user":
            self.state, extra = self.user_level_average(updates)
        else:
            self.state, extra = self.aggregate_updates(updates, weights)
        metrics.update(extra)
        metrics["train_loss"] = float(sum(p * u.metrics.get("train_loss", 0.0) for p, u in zip(weights, updates)))
        return to_record(self.state), MetricRecord(metrics)

    def user_level_average(self, updates: list[ClientUpdate]) -> tuple[AdapterState, dict[str, float]]:
        """User-level DP: global + (1/m) Σ_k clip(Δ_k, C) + N(0, (σC/m)²), Δ_k = upload_k − global.

        Only for linear averages (fedavg, ffa, fedsb; config validation refuses the others).
        Each round is one subsampled Gaussian mechanism with rate q = m / N (N nodes online),
        composed over rounds by the accountant into the cumulative user-level ``epsilon``.
        """
        deltas = [{k: u.state[k].astype(np.float64) - self.state[k] for k in u.state} for u in updates]
        noisy, metrics = self.user_level_release(deltas, self.current_round)
        return {**self.state, **{k: (self.state[k] + v).astype(np.float32) for k, v in noisy.items()}}, metrics

    def planned_releases(self) -> int:
        """How many user-level DP releases the run plans (one per round; Fed-SB adds its gradient round)."""
        return self.cfg.num_server_rounds

    def user_level_release(self, deltas: list[AdapterState], server_round: int) -> tuple[AdapterState, dict[str, float]]:
        """(1/m) Σ_k clip(Δ_k, C) + N(0, (σC/m)²), accounted as one mechanism of rate m / N; also its metrics.

        σ is ``dp.noise-multiplier``, or calibrated so that :meth:`planned_releases` meet
        ``dp.target-epsilon``; the noise is drawn from an RNG of (seed, ``server_round``).
        """
        dp = self.cfg.dp
        sigma = dp.noise_multiplier or calibrate_noise(dp.target_epsilon, dp.delta, self.cfg.fraction_train,
                                                       self.planned_releases(), dp.accountant)
        noisy = noisy_average(deltas, dp.max_grad_norm, sigma, np.random.default_rng((self.cfg.seed, server_round)))
        self.user_dp_history.append((sigma, len(deltas) / max(self._num_nodes, len(deltas)), 1))
        return noisy, {"epsilon": user_level_epsilon(self.user_dp_history, dp.delta, dp.accountant), "noise-multiplier": sigma}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.cfg.fraction_evaluate == 0:
            return []
        nodes = self._sample(grid, self.cfg.fraction_evaluate)
        return self._messages(nodes, server_round, MessageType.EVALUATE)[0]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = [dict(r.content[METRICS]) for r in replies if not r.has_error()]
        if not results:
            return None
        weights = client_weights([int(m["num-examples"]) for m in results], self.cfg.weighting)
        keys = [k for k in results[0] if k.startswith("eval_")]
        return MetricRecord({f"client_{k}": float(sum(p * m[k] for p, m in zip(weights, results))) for k in keys})

    # ----- the round loop -----------------------------------------------------------
    def run(self, grid: Grid, evaluate_fn: Callable[[], dict[str, float]], on_round: Callable[[int, dict], None],
            first_round: int = 0) -> None:
        """Round 0 initialises and evaluates; rounds 1..N train, aggregate, evaluate, report.

        ``evaluate_fn`` evaluates the current global model (see :meth:`apply_to`). A resumed
        run (state from :meth:`restore_state`) starts at ``first_round`` > 0, without round 0.
        A round with fewer than ``min-clients`` valid replies is skipped: the global state
        stays, and its record says why (``skipped``) next to the failures (``rejected``).
        """
        if first_round == 0:
            init = {"bytes_up": 0.0, "bytes_down": 0.0, **self.initialize(grid)}
            on_round(0, {**init, **evaluate_fn()})
        aggregated = 0
        first = max(first_round, 1)
        for server_round in range(first, self.cfg.num_server_rounds + 1):
            started = time.monotonic()
            messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
            replies = self._send(grid, messages)
            _, train_metrics = self.aggregate_train(server_round, replies)
            record: dict = dict(train_metrics or {})
            silent = sorted({m.metadata.dst_node_id for m in messages} - {self._node_of(r) for r in replies})
            rejected = self._rejected + [f"node {n}: no reply within round-timeout = {self.cfg.round_timeout:g} s" for n in silent]
            if rejected:
                record["rejected"] = rejected
            if record.get("num_clients", 0) < self.cfg.min_clients:
                record["skipped"] = (f"{int(record.get('num_clients', 0))} valid replies < min-clients = {self.cfg.min_clients}"
                                     if messages else f"no node connected within round-timeout = {self.cfg.round_timeout:g} s")
                log(WARNING, "round %d skipped, global state unchanged: %s", server_round, record["skipped"])
                self.skip_round(server_round)
            else:
                aggregated += 1
            evaluate_messages = list(self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
            if evaluate_messages:
                client_eval = self.aggregate_evaluate(server_round, self._send(grid, evaluate_messages))
                record.update(dict(client_eval or {}))
            record.update(evaluate_fn())
            record["round_seconds"] = time.monotonic() - started
            on_round(server_round, record)
        if first <= self.cfg.num_server_rounds and not aggregated:
            log(WARNING, "rounds %d..%d aggregated no client update: the global adapter did not change in them",
                first, self.cfg.num_server_rounds)
