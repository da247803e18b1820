"""FLoRA's server part: stack the clients' weighted factors, merge them into every base, restart LoRA."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel

from fedlora.adapters.lora import LORA_A, LORA_B, inject_lora, load_adapter_state, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.models.loading import load_base_model
from fedlora.protocol import ARRAYS, RANK
from fedlora.server.merges import MergeLog
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.strategy import ServerStrategy, shapes_of
from fedlora.server.validation import Shapes, announced_rank
from fedlora.strategies.common import aggregate_extras
from fedlora.strategies.flora.math import concat_stacks, flora_error, stacked_state
from fedlora.task import load_task


class FLoRAServer(ServerStrategy):
    """The global state is the fully-trained extras (a head); each round's stack is merged into every base.

    Every node receives, with its next training message, exactly the merges it has not yet
    seen (``merge-<round>`` records: Σ_k r_k (d+k) floats per module and round). ``total``
    is the running sum of all merges: the final adapter.
    """

    checkpointed = ("total",)

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, {k: v for k, v in initial_state.items() if not k.endswith((LORA_A, LORA_B))})
        self.log = MergeLog()
        self.total: AdapterState = {}
        self.module_dims = {m: (initial_state[m + LORA_B].shape[0], initial_state[m + LORA_A].shape[1])
                            for m in lora_modules(initial_state)}

    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        return {ARRAYS: self.state, **self.log.missing(node_id, server_round)}

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        self.log.delivered(server_round, node_ids)

    def skipped(self, server_round: int) -> None:
        self.log.record(server_round, {})

    def expected_upload(self, server_round: int, update: ClientUpdate) -> Shapes:
        """The extras plus, per module, A (r_k×k) and B (d×r_k) at the rank r_k the client announces."""
        r = announced_rank(update.metrics, self.cfg.lora.allowed_ranks)
        shapes = shapes_of(self.state)
        for m, (d, k) in self.module_dims.items():
            shapes[m + LORA_A] = (r, k)
            shapes[m + LORA_B] = (d, r)
        return shapes

    def checkpoint_state(self) -> tuple[AdapterState, dict[str, Any]]:
        """Adds every round's merge (who received which is per run, not kept)."""
        arrays, values = super().checkpoint_state()
        merge_arrays, merge_values = self.log.checkpoint()
        return {**arrays, **merge_arrays}, {**values, **merge_values}

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        super().restore_state(arrays, values)
        self.log.restore(arrays, values)

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = done.states()
        scales = [self.cfg.lora.alpha / u.metrics[RANK] for u in done.updates]
        stack = stacked_state(states, weights, scales)
        self.log.record(done.number, stack)
        self.total = concat_stacks(self.total, stack)
        extras = aggregate_extras(states, weights, (LORA_A, LORA_B))
        rank = next(iter(v.shape[0] for k, v in stack.items() if k.endswith(LORA_A)))
        return extras, {"agg_error": flora_error(stack, states, weights, scales), "stacked_rank": float(rank)}

    def apply_to(self, model: PeftModel) -> None:
        self.log.bring(model)
        zero_lora = {k: v for k, v in model.initial_state.items() if k.endswith((LORA_A, LORA_B))}
        load_adapter_state(model, {**zero_lora, **self.state})

    def save_final(self, model: PeftModel, path: Path) -> None:
        """The run's whole merged update as one exact LoRA of the total stacked rank (scale 1)."""
        if not self.total:
            return super().save_final(model, path)
        rank = next(v.shape[0] for k, v in self.total.items() if k.endswith(LORA_A))
        lora = dataclasses.replace(self.cfg.lora, rank=rank, alpha=float(rank), client_ranks="")
        task = load_task(self.cfg)
        final = inject_lora(load_base_model(self.cfg.model.name, task.kind, task.num_labels), lora, task.kind, self.cfg.seed)
        load_adapter_state(final, {**self.total, **self.state})
        final.save_pretrained(path)
