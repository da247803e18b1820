"""FedEx-LoRA's client part: fold every residual so far into the base, then continue from (Ā, B̄)."""

from __future__ import annotations

import torch

from fedlora.adapters.lora import load_adapter_state
from fedlora.client.role import ClientRole, Incoming, replay_merges
from fedlora.task import adapted_model


class ResidualBase(ClientRole):
    """Replay the server's residual merges onto this run's own copy of the base; load and train (Ā, B̄, head)."""

    def prepare(self, msg: Incoming) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        model = adapted_model(msg.cfg, str(msg.device), variant=f"merged-base-run-{msg.context.run_id}")
        replay_merges(model, msg)
        load_adapter_state(model, msg.received())
        return model, self.trainable(model, msg.server_round)
