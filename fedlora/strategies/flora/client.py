"""FLoRA's client part: bring the base up to date with every merge so far, then train a fresh rank-r_k LoRA."""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import Context, RecordDict

from fedlora.adapters.lora import fresh_lora_state, load_adapter_state
from fedlora.adapters.transport import from_record
from fedlora.client.role import ClientRole, replay_merges
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS
from fedlora.task import adapted_model


class FreshLoRA(ClientRole):
    """Replay the server's merges onto this run's own copy of the base, then a fresh LoRA (A random, B = 0)."""

    def prepare(self, cfg: RunConfig, content: RecordDict, context: Context, partition_id: int,
                server_round: int, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        lora = dataclasses.replace(cfg.lora, rank=cfg.lora.rank_of(partition_id))
        model = adapted_model(cfg, str(device), lora, variant=f"merged-base-run-{context.run_id}")
        replay_merges(model, content, context, partition_id, server_round)
        fresh = fresh_lora_state(model, seed=(cfg.seed, server_round, partition_id))
        load_adapter_state(model, {**fresh, **from_record(content[ARRAYS])})
        return model, self.trainable(model, server_round)
