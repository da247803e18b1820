"""FFA-LoRA's client part: A is this client's seeded initial A; only B (+ head) trains and travels."""

from __future__ import annotations

import torch
from peft import PeftModel

from fedlora.adapters.lora import LORA_A, adapter_state
from fedlora.adapters.state import AdapterState
from fedlora.adapters.transport import digest
from fedlora.client.role import ClientRole, Incoming
from fedlora.protocol import CONFIG, FFA_A_DIGEST


class FrozenA(ClientRole):
    """Load the received B (+ head) over the seeded A; refuse when that A differs from the server's."""

    train_a = False

    def full_state(self, model: PeftModel, msg: Incoming) -> AdapterState:
        own_a = {k: v for k, v in model.initial_state.items() if k.endswith(LORA_A)}
        expected = str(msg.content[CONFIG].get(FFA_A_DIGEST, ""))
        if expected and expected != digest(own_a):
            raise RuntimeError(
                f"FFA-LoRA: this client's frozen A (digest {digest(own_a)}) differs from the server's ({expected}); "
                "server and clients must use the same model, lora.* settings, seed and torch version"
            )
        return {**own_a, **msg.received()}

    def upload(self, model: torch.nn.Module, msg: Incoming) -> AdapterState:
        return {k: v for k, v in adapter_state(model).items() if not k.endswith(LORA_A)}
