"""RoLoRA's client part: load the whole global adapter, train and upload B (odd rounds) or A (even rounds) + head."""

from __future__ import annotations

import torch
from peft import PeftModel

from fedlora.adapters.lora import LORA_B, adapter_state, set_trainable
from fedlora.adapters.state import AdapterState
from fedlora.client.role import ClientRole, Incoming
from fedlora.strategies.rolora.math import trained_factor, upload_part


class Alternating(ClientRole):
    """The factor trained in a round follows from its number (:func:`fedlora.strategies.rolora.math.trained_factor`)."""

    def trainable(self, model: PeftModel, server_round: int) -> list[torch.nn.Parameter]:
        trains_b = trained_factor(server_round) == LORA_B
        return set_trainable(model, train_a=not trains_b, train_b=trains_b)

    def upload(self, model: torch.nn.Module, msg: Incoming) -> AdapterState:
        return upload_part(adapter_state(model), msg.server_round)
