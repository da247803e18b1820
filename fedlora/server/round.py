"""The values one round is made of: the parsed client updates, and the round itself.

A :class:`Round` records one exchange with the clients — whom the server sampled out of
how many online, the bytes both ways, the valid updates and every rejection with its
reason — so nothing about a round lives in temporaries on a strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.adapters.state import AdapterState
from fedlora.protocol import EPSILON

Kind = TypeVar("Kind", ArrayRecord, ConfigRecord, MetricRecord)


def reply_record(content: RecordDict, name: str, kind: type[Kind]) -> Kind | None:
    """The record ``name`` of a message's content if it is a ``kind``, else None: one lookup, where Flower's
    ``content.metric_records`` (and its siblings) build a filtered copy of every record on each access."""
    record = content.get(name)
    return record if isinstance(record, kind) else None


@dataclass
class ClientUpdate:
    """One client's parsed, validated reply."""

    node_id: int
    partition_id: int
    state: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: ‖state − the state it started from‖₂, measured when the reply was validated (the norm bound's input)
    update_norm: float = 0.0
    #: tensor name -> what the strategy's :meth:`~fedlora.server.strategy.ServerStrategy.observe_upload` made of
    #: ``state[name]`` during validation; emptied whenever ``state`` is replaced (the norm bound's rescaling)
    observed: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Round:
    """One exchange with the clients: what was sent, what came back, what was rejected."""

    number: int
    sampled: list[int]
    #: nodes online when the round sampled (N in user-level DP's sampling rate m / N)
    population: int
    bytes_down: int
    sent_at: float
    #: message id -> destination node (the SuperLink writes a dead node's error reply itself)
    destinations: dict[str, int] = field(default_factory=dict)
    updates: list[ClientUpdate] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    #: updates that entered the round bounded, and why (see :mod:`fedlora.server.influence`)
    clipped: list[str] = field(default_factory=list)
    #: cumulative ε that refusing clients reported (they count in the round's privacy metrics)
    refused_epsilons: list[float] = field(default_factory=list)
    bytes_up: int = 0

    def node_of(self, reply: Message) -> int:
        """The node a reply answers for: its message's destination, else the reply's source."""
        return self.destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def privacy_metrics(self) -> dict[str, float]:
        """``epsilon_max``/``epsilon_mean``: cumulative sample-level ε over the round's clients,
        refusing ones included (empty without sample-level DP)."""
        epsilons = self.refused_epsilons + [u.metrics[EPSILON] for u in self.updates if EPSILON in u.metrics]
        return {"epsilon_max": max(epsilons), "epsilon_mean": float(np.mean(epsilons))} if epsilons else {}

    def metrics(self) -> dict[str, float]:
        """The traffic and participation numbers every round reports."""
        return {"bytes_down": float(self.bytes_down), "num_sampled": float(len(self.sampled)),
                "bytes_up": float(self.bytes_up), "num_clients": float(len(self.updates)), **self.privacy_metrics()}

    def states(self) -> list[AdapterState]:
        return [u.state for u in self.updates]
