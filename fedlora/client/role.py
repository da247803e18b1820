"""What a client does with a strategy's messages: prepare the model, then say what to upload.

A strategy's client part is a :class:`ClientRole` subclass named in its registry entry.
The ClientApp (:mod:`fedlora.client.app`) calls, for a training message,
:meth:`ClientRole.prepare` (global state loaded into the process's cached model, the
strategy's trainable tensors unfrozen), runs the local loop, then :meth:`ClientRole.upload`.
The default role is FedIT's: load the whole adapter, train A, B (and a head), upload all.

Strategies whose server changes the base weights (FLoRA's stacks, FedEx-LoRA's residuals)
send ``merge-<round>`` records; :func:`replay_merges` keeps them in the node's store and
brings the cached model's base up to the round before training. Strategies with a global
rank and clients of their own ranks (FlexLoRA, HetLoRA) send ordered factors at scale 1
that :class:`OwnRank` cuts to the client's rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context, RecordDict
from peft import PeftModel

from fedlora.adapters.lora import (
    LORA_A, LORA_B, adapter_state, bring_base_to, load_adapter_state, lora_modules, scaling, set_trainable,
)
from fedlora.adapters.state import AdapterState
from fedlora.adapters.transport import from_record
from fedlora.client.node_store import NodeStore, run_label
from fedlora.client.privacy import RoundPlan
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS, CONFIG, MERGE_PREFIX, RANK, merge_record
from fedlora.task import adapted_model


@dataclass(frozen=True)
class Incoming:
    """One message as a client part sees it: the run config, what arrived, the node, the round, the device."""

    cfg: RunConfig
    content: RecordDict
    context: Context
    partition_id: int
    server_round: int
    device: torch.device

    def received(self) -> AdapterState:
        """The global state the server sent (its ``arrays`` record)."""
        return from_record(self.content[ARRAYS])

    def store(self) -> NodeStore:
        """This node's store for this logical run (memory and disk; survives restarts)."""
        return NodeStore(self.context, self.partition_id, run_label(self.context, self.content[CONFIG]))


class ClientRole:
    """FedIT's client: the whole adapter travels both ways, A, B and the head train."""

    train_a = True
    train_b = True

    def prepare(self, msg: Incoming) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """The model to train this round (global state loaded) and its trainable parameters."""
        model = adapted_model(msg.cfg, str(msg.device))
        load_adapter_state(model, self.full_state(model, msg))
        return model, self.trainable(model, msg.server_round)

    def prepare_evaluation(self, msg: Incoming) -> torch.nn.Module:
        """The model to evaluate after round ``msg.server_round`` (default: as for training, nothing changed)."""
        return self.prepare(msg)[0]

    def trainable(self, model: PeftModel, server_round: int) -> list[torch.nn.Parameter]:
        """Unfreeze what this strategy trains in ``server_round``; the parameters to optimise."""
        return set_trainable(model, train_a=self.train_a, train_b=self.train_b)

    def full_state(self, model: PeftModel, msg: Incoming) -> AdapterState:
        """The whole adapter state to load, from what the server sent."""
        return msg.received()

    def upload(self, model: torch.nn.Module, msg: Incoming) -> AdapterState:
        """What the client sends back after training on ``msg`` (and keeps, if the strategy keeps anything)."""
        return adapter_state(model)

    def reply_metrics(self, cfg: RunConfig, partition_id: int) -> dict[str, int | float]:
        """Extra numbers for the reply: the client's LoRA rank."""
        return {RANK: cfg.lora.rank_of(partition_id)}

    def setup_steps(self, cfg: RunConfig) -> int:
        """DP steps of the setup phase before round 1 (0: the strategy has none)."""
        return 0

    def setup(self, cfg: RunConfig, rows: list[dict], config: dict, partition_id: int, device: torch.device,
              privacy: RoundPlan | None) -> AdapterState:
        """The upload of the setup phase (only strategies with ``Capabilities.setup_round`` are asked)."""
        raise RuntimeError(f"{type(self).__name__}: this strategy has no setup phase")


class OwnRank(ClientRole):
    """A client at its own rank r_k (``lora.client-ranks``) of a global adapter of rank R ≥ r_k.

    The server sends the global LoRA factors at scale 1 (ΔW = B·A), ordered so that the first
    r_k components are what a rank-r_k client should hold; the client keeps B[:, :r_k] and
    A[:r_k] and divides B by its own scale s_k = α / r_k, so that s_k·B_k·A_k is exactly
    those components. It uploads its factors as trained (at scale s_k; the server knows r_k
    from the ``rank`` it announces).
    """

    def prepare(self, msg: Incoming) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        lora = dataclasses.replace(msg.cfg.lora, rank=msg.cfg.lora.rank_of(msg.partition_id))
        model = adapted_model(msg.cfg, str(msg.device), lora)
        load_adapter_state(model, cut_to_rank(msg.received(), lora.rank, scaling(lora)))
        return model, self.trainable(model, msg.server_round)


def cut_to_rank(received: AdapterState, rank: int, scale: float) -> AdapterState:
    """The first ``rank`` components of scale-1 factors, as a LoRA of scale ``scale``: B[:, :r] / s, A[:r]."""
    out = dict(received)
    for m in lora_modules(received):
        B, A = received[m + LORA_B], received[m + LORA_A]
        if A.shape[0] < rank:
            raise RuntimeError(f"the server sent rank {A.shape[0]} factors for {m}; this client trains at rank {rank}")
        out[m + LORA_B] = (B[:, :rank] / np.float32(scale)).astype(np.float32)
        out[m + LORA_A] = np.ascontiguousarray(A[:rank])
    return out


def replay_merges(model: PeftModel, msg: Incoming) -> None:
    """Store the ``merge-<j>`` records of the message in the node's store, then merge rounds up to ``server_round − 1``.

    The merges outlive the process (node store on disk), so the cached model — which may
    serve several nodes in simulation, or be fresh after a restart — can always replay
    exactly the merges 1 … round−1 onto its base weights; a missing one is refused.
    """
    store = msg.store()
    for name in msg.content.array_records:
        if name.startswith(MERGE_PREFIX):
            store.put(name, from_record(msg.content[name]))
    bring_base_to(model, msg.server_round - 1, lambda j: store.get(merge_record(j)))
