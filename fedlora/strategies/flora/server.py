"""FLoRA's server part: stack the clients' weighted factors, merge them into every base, restart LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from peft import PeftModel

from fedlora.adapters.lora import LORA_A, LORA_B, load_adapter_state, lora_modules
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.protocol import RANK
from fedlora.server.merges import MergingServer
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.strategy import shapes_of
from fedlora.server.validation import Shapes, announced_rank
from fedlora.strategies.common import aggregate_extras
from fedlora.strategies.flora.math import stacked_state


class FLoRAServer(MergingServer):
    """The global state is the fully-trained extras (a head); each round's stack is merged into every base.

    Every node receives, with its next training message, exactly the merges it has not yet
    seen (``merge-<round>`` records: Σ_k r_k (d+k) floats per module and round). The merges'
    running total is the final adapter.
    """

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, {k: v for k, v in initial_state.items() if not k.endswith((LORA_A, LORA_B))})
        self.module_dims = {m: (initial_state[m + LORA_B].shape[0], initial_state[m + LORA_A].shape[1])
                            for m in lora_modules(initial_state)}

    def expected_upload(self, server_round: int, update: ClientUpdate) -> Shapes:
        """The extras plus, per module, A (r_k×k) and B (d×r_k) at the rank r_k the client announces."""
        r = announced_rank(update.metrics, self.cfg.lora.allowed_ranks)
        shapes = shapes_of(self.state)
        for m, (d, k) in self.module_dims.items():
            shapes[m + LORA_A] = (r, k)
            shapes[m + LORA_B] = (d, r)
        return shapes

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = done.states()
        scales = [self.cfg.lora.alpha / u.metrics[RANK] for u in done.updates]
        self.log.record(done.number, stacked_state(states, weights, scales))
        extras = aggregate_extras(states, weights, (LORA_A, LORA_B))
        module = lora_modules(states[0])[0]
        metrics = {"stacked_rank": float(sum(state[module + LORA_A].shape[0] for state in states))}
        if self.measures_error(done.number):
            metrics["agg_error"] = 0.0  # the merge is the ideal update exactly (float64 coefficients, factors as sent)
        return extras, metrics

    def apply_to(self, model: PeftModel) -> None:
        self.log.bring(model)
        zero_lora = {k: v for k, v in model.initial_state.items() if k.endswith((LORA_A, LORA_B))}
        load_adapter_state(model, {**zero_lora, **self.state})

    def save_final(self, model: PeftModel, path: Path) -> None:
        """The run's whole merged update as one exact LoRA of the total stacked rank (scale 1)."""
        if not any(self.log.merges.values()):
            return super().save_final(model, path)
        self.log.save_with(self.cfg, self.state, path)
