"""FLoRA's client part: bring the base up to date with every merge so far, then train a fresh rank-r_k LoRA."""

from __future__ import annotations

import dataclasses

import torch

from fedlora.adapters.lora import fresh_lora_state, load_adapter_state
from fedlora.client.role import ClientRole, Incoming, replay_merges
from fedlora.task import adapted_model


class FreshLoRA(ClientRole):
    """Replay the server's merges onto this run's own copy of the base, then a fresh LoRA (A random, B = 0)."""

    def prepare(self, msg: Incoming) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        cfg = msg.cfg
        lora = dataclasses.replace(cfg.lora, rank=cfg.lora.rank_of(msg.partition_id))
        model = adapted_model(cfg, str(msg.device), lora, variant=f"merged-base-run-{msg.context.run_id}")
        replay_merges(model, msg)
        fresh = fresh_lora_state(model, seed=(cfg.seed, msg.server_round, msg.partition_id))
        load_adapter_state(model, {**fresh, **msg.received()})
        return model, self.trainable(model, msg.server_round)
