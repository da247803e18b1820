"""What a client does with the global state, per strategy: prepare the model, then upload.

A role turns a training message into a model ready to train (global state loaded, the
strategy's trainable tensors unfrozen) and the trained model into the state it uploads:

* :class:`FullLoRA`  — fedavg, lorafair: load A, B (+ head); train and upload all of them.
* :class:`FrozenA`   — ffa: A comes from the shared run seed and never travels; only B (+ head).
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from peft import PeftModel

from fedlora.adapters.lora import LORA_A, AdapterState, adapter_state, load_adapter_state, set_trainable
from fedlora.adapters.transport import digest, from_record
from fedlora.config import RunConfig
from fedlora.strategies.base import ARRAYS
from fedlora.task import adapted_model


def frozen_a(state: AdapterState) -> AdapterState:
    return {k: v for k, v in state.items() if k.endswith(LORA_A)}


class ClientRole:
    """Default: nothing frozen beyond the base model (FedIT-style clients)."""

    train_a = True

    def prepare(self, cfg: RunConfig, content: RecordDict, node_state: RecordDict, partition_id: int,
                server_round: int, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        model = adapted_model(cfg, str(device))
        load_adapter_state(model, self.full_state(model, from_record(content[ARRAYS]), content))
        return model, set_trainable(model, train_a=self.train_a)

    def full_state(self, model: PeftModel, received: AdapterState, content: RecordDict) -> AdapterState:
        return received

    def upload(self, model: torch.nn.Module) -> AdapterState:
        return adapter_state(model)

    def reply_metrics(self, cfg: RunConfig, partition_id: int) -> dict[str, int | float]:
        """Extra numbers for the reply (e.g. the client's rank)."""
        return {"rank": cfg.lora.rank}


class FullLoRA(ClientRole):
    """fedavg and lorafair clients: the whole adapter travels both ways."""


class FrozenA(ClientRole):
    """FFA-LoRA clients: A is the seeded initial A on every client; only B (+ head) travels."""

    train_a = False

    def full_state(self, model: PeftModel, received: AdapterState, content: RecordDict) -> AdapterState:
        own_a = frozen_a(model.initial_state)
        expected = str(content["config"].get("ffa-a-digest", ""))
        if expected and expected != digest(own_a):
            raise RuntimeError(
                f"FFA-LoRA: this client's frozen A (digest {digest(own_a)}) differs from the server's ({expected}); "
                "server and clients must use the same model, lora.* settings, seed and torch version"
            )
        return {**own_a, **received}

    def upload(self, model: torch.nn.Module) -> AdapterState:
        return {k: v for k, v in adapter_state(model).items() if not k.endswith(LORA_A)}


#: strategy name -> client role
ROLES: dict[str, ClientRole] = {"fedavg": FullLoRA(), "lorafair": FullLoRA(), "ffa": FrozenA()}


def client_role(strategy: str) -> ClientRole:
    return ROLES[strategy]
