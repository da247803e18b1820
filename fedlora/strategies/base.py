"""The thin Flower shell every fedlora strategy shares.

It only moves Messages: sample clients, send them the global state, collect replies,
hand the parsed updates to the subclass's pure ``aggregate_updates`` and record what
travelled. A round: ``configure_train`` → clients train → ``aggregate_train`` → core math
→ new global state → server evaluation → ``on_round`` (metrics sink, checkpoint).
"""

from __future__ import annotations

import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

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

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"


@dataclass
class ClientUpdate:
    """One client's parsed training reply."""

    node_id: int
    partition_id: int
    state: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class LoraStrategy(Strategy):
    """Shared plumbing; subclasses implement :meth:`aggregate_updates` (pure math)."""

    name = "base"

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        self.cfg = cfg
        self.state = initial_state
        self._rng = random.Random(cfg.seed)
        self._round_metrics: dict[str, float] = {}
        self._rejected: list[str] = []
        self.current_round = 0
        self._epsilons: list[float] = []
        self._num_nodes = 0
        self.user_dp_history: list[tuple[float, float, int]] = []

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
        config = {"server-round": server_round, **self.client_config(server_round), **(extra_config or {})}
        messages, total = [], 0
        for node in nodes:
            records = {name: to_record(state) for name, state in self.download(server_round, node).items()}
            total += sum(record_bytes(r) for r in records.values())
            content = RecordDict({**records, CONFIG: ConfigRecord(dict(config))})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages, total

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = self._sample(grid, self.cfg.fraction_train)
        messages, bytes_down = self._messages(nodes, server_round, MessageType.TRAIN)
        self._round_metrics = {"bytes_down": float(bytes_down), "num_sampled": float(len(nodes))}
        return messages

    def _parse(self, reply: Message) -> ClientUpdate:
        content = reply.content
        metrics = dict(content[METRICS])
        return ClientUpdate(
            node_id=reply.metadata.src_node_id,
            partition_id=int(metrics.get("partition-id", -1)),
            state=from_record(content[ARRAYS]),
            num_examples=int(metrics["num-examples"]),
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        )

    def collect(self, replies: Iterable[Message]) -> tuple[list[ClientUpdate], int, list[str]]:
        """Parse the replies that carry results, in a fixed order; also their array bytes and the failures."""
        updates: list[ClientUpdate] = []
        bytes_up = 0
        failures = []
        for reply in replies:
            if reply.has_error():
                failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            if STATUS in reply.content.config_records and "refused" in reply.content[STATUS]:
                failures.append(f"node {reply.metadata.src_node_id} refused: {reply.content[STATUS]['refused']}")
                self._epsilons.append(float(reply.content[METRICS].get("epsilon", 0.0)))
                continue
            bytes_up += record_bytes(reply.content[ARRAYS])
            updates.append(self._parse(reply))
        updates.sort(key=lambda u: (u.partition_id, u.node_id))  # fixed summation order: reproducible
        return updates, bytes_up, failures

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.current_round = server_round
        self._epsilons = []
        updates, bytes_up, self._rejected = self.collect(replies)
        self.delivered(server_round, [u.node_id for u in updates])
        metrics = dict(self._round_metrics, bytes_up=float(bytes_up), num_clients=float(len(updates)))
        self._epsilons += [u.metrics["epsilon"] for u in updates if "epsilon" in u.metrics]
        if self._epsilons:
            metrics.update(epsilon_max=max(self._epsilons), epsilon_mean=float(np.mean(self._epsilons)))
        if len(updates) < self.cfg.min_clients:
            log(INFO, "round %d: %d replies < min-clients=%d, global state unchanged", server_round, len(updates), self.cfg.min_clients)
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
        dp = self.cfg.dp
        sigma = dp.noise_multiplier or calibrate_noise(dp.target_epsilon, dp.delta, self.cfg.fraction_train,
                                                       self.cfg.num_server_rounds, dp.accountant)
        deltas = [{k: u.state[k].astype(np.float64) - self.state[k] for k in u.state} for u in updates]
        noisy = noisy_average(deltas, dp.max_grad_norm, sigma, np.random.default_rng((self.cfg.seed, self.current_round)))
        new_state = {**self.state, **{k: (self.state[k] + v).astype(np.float32) for k, v in noisy.items()}}
        self.user_dp_history.append((sigma, len(updates) / max(self._num_nodes, len(updates)), 1))
        return new_state, {"epsilon": user_level_epsilon(self.user_dp_history, dp.delta, dp.accountant),
                           "noise-multiplier": sigma}

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
    def run(self, grid: Grid, evaluate_fn: Callable[[], dict[str, float]], on_round: Callable[[int, dict], None]) -> None:
        """Round 0 initialises and evaluates; rounds 1..N train, aggregate, evaluate, report.

        ``evaluate_fn`` evaluates the current global model (see :meth:`apply_to`).
        """
        init = {"bytes_up": 0.0, "bytes_down": 0.0, **self.initialize(grid)}
        on_round(0, {**init, **evaluate_fn()})
        for server_round in range(1, self.cfg.num_server_rounds + 1):
            started = time.monotonic()
            messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=self.cfg.round_timeout) if messages else []
            _, train_metrics = self.aggregate_train(server_round, replies)
            record: dict = dict(train_metrics or {})
            if self._rejected:
                record["rejected"] = list(self._rejected)
            evaluate_messages = list(self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
            if evaluate_messages:
                client_eval = self.aggregate_evaluate(server_round, grid.send_and_receive(evaluate_messages, timeout=self.cfg.round_timeout))
                record.update(dict(client_eval or {}))
            record.update(evaluate_fn())
            record["round_seconds"] = time.monotonic() - started
            on_round(server_round, record)
