"""FedSA-LoRA's client part: the received Ā (+ head) over this client's own B, which only training changes.

The client's B lives in its node store (memory and disk, so it survives a restart) as the
two latest versions, each tagged with the round that trained it. Two, because a server
that resumes from its checkpoint repeats the round in flight: the repetition of round t
must start from the B trained before t, not from the one its interrupted first attempt
left behind.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import PeftModel

from fedlora.adapters.lora import adapter_state, load_adapter_state
from fedlora.adapters.state import AdapterState
from fedlora.client.node_store import NodeStore
from fedlora.client.role import ClientRole, Incoming
from fedlora.strategies.fedsa.math import own_part
from fedlora.task import adapted_model

#: node-store records of the newest and the one older version of the client's B
LATEST, EARLIER = "fedsa-own-b", "fedsa-own-b-earlier"
#: the tag inside a record: the round that trained that B
TRAINED_IN = "trained-in-round"


class OwnB:
    """One node's own B in one run: ``load`` the newest version trained by a round, ``save`` a new one."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store

    def _versions(self) -> list[tuple[int, str, AdapterState]]:
        """(round that trained it, record name, B) of every stored version."""
        versions = []
        for name in (LATEST, EARLIER):
            record = self.store.get(name)
            if record is not None:
                own_b = {k: v for k, v in record.items() if k != TRAINED_IN}
                versions.append((int(record[TRAINED_IN][0]), name, own_b))
        return versions

    def load(self, through: int) -> AdapterState | None:
        """B as trained in the latest round ≤ ``through``; None when no round up to it trained one."""
        usable = [v for v in self._versions() if v[0] <= through]
        return max(usable, key=lambda v: v[0])[2] if usable else None

    def save(self, server_round: int, own_b: AdapterState) -> None:
        """Keep the newest version trained before ``server_round`` as the earlier one, then ``own_b`` as the latest."""
        before = [v for v in self._versions() if v[0] < server_round]
        if before:
            trained_in, name, kept = max(before, key=lambda v: v[0])
            if name != EARLIER:
                self._put(EARLIER, trained_in, kept)
        self._put(LATEST, server_round, own_b)

    def _put(self, name: str, trained_in: int, own_b: AdapterState) -> None:
        self.store.put(name, {**own_b, TRAINED_IN: np.array([trained_in], dtype=np.float32)})


class PersonalB(ClientRole):
    """Load Ā (+ head) over the client's own B; train A, B and the head; keep the new B, upload everything.

    Training round t starts from the B trained before t; the evaluation after round t uses
    the B trained in t (a personalised model), and never changes it.
    """

    def _personal(self, msg: Incoming, through: int) -> PeftModel:
        model = adapted_model(msg.cfg, str(msg.device))
        own_b = OwnB(msg.store()).load(through)
        load_adapter_state(model, {**msg.received(), **(own_b if own_b is not None else own_part(model.initial_state))})
        return model

    def prepare(self, msg: Incoming) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        model = self._personal(msg, msg.server_round - 1)
        return model, self.trainable(model, msg.server_round)

    def prepare_evaluation(self, msg: Incoming) -> torch.nn.Module:
        return self._personal(msg, msg.server_round)

    def upload(self, model: torch.nn.Module, msg: Incoming) -> AdapterState:
        state = adapter_state(model)
        OwnB(msg.store()).save(msg.server_round, own_part(state))
        return state
