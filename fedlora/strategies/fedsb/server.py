"""Fed-SB's server part: a setup phase fixes B and A; afterwards only R (+ head) travels, averaged exactly.

The setup phase asks the clients for full-weight gradients of the target modules on
``fedsb.init-batches`` batches (these bytes count in round 0), averages them to Ḡ and
initialises B, R0, A from the truncated SVD of ``−(lr/s)·Ḡ``, so the starting update
s·B R0 A is the best rank-r approximation of one gradient step. Each node receives B and
A once, with its first training message; R̄ travels every round.
"""

from __future__ import annotations

import numpy as np
from peft import PeftModel

from fedlora.adapters.lora import LORA_A, LORA_B, PEFT_PREFIX, load_adapter_state, lora_modules, scaling
from fedlora.adapters.lorasb import to_peft_lora
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS, FEDSB_TARGETS, LORASB_FACTORS, PHASE, SETUP
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.strategy import ServerStrategy
from fedlora.server.validation import Shapes
from fedlora.strategies.fedsb.math import average_with_error, lorasb_init_states


class FedSBServer(ServerStrategy):
    """Before the setup phase the global state is empty; then it is R0 (+ head), and R̄ (+ head) after each round."""

    checkpointed = ("frozen",)  # the fixed B, A (``factors_sent`` is per run, not kept)

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, {})
        self.targets = [m[len(PEFT_PREFIX):] for m in lora_modules(initial_state)]
        self.dense_shapes = {m[len(PEFT_PREFIX):]: (initial_state[m + LORA_B].shape[0], initial_state[m + LORA_A].shape[1])
                             for m in lora_modules(initial_state)}
        self.head = {k[len(PEFT_PREFIX):]: v for k, v in initial_state.items() if not k.endswith((LORA_A, LORA_B))}
        self.scale = scaling(cfg.lora)
        self.frozen: AdapterState = {}
        self.factors_sent: set[int] = set()

    def setup_config(self) -> dict[str, int | float | str] | None:
        return {PHASE: SETUP, FEDSB_TARGETS: ",".join(self.targets)}

    def setup_expected_upload(self, update: ClientUpdate) -> Shapes:
        """One dense d×k gradient per target module."""
        return dict(self.dense_shapes)

    def finish_setup(self, average: AdapterState) -> None:
        step = -self.cfg.lr / self.scale
        self.frozen, initial_R = lorasb_init_states({m: step * g for m, g in average.items()}, self.cfg.lora.rank)
        self.state = {**initial_R, **self.head}

    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        records = {ARRAYS: self.state}
        if node_id not in self.factors_sent:
            records[LORASB_FACTORS] = self.frozen
        return records

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        self.factors_sent.update(node_ids)

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        return average_with_error(done.states(), weights, self.frozen, self.scale, self.measures_error(done.number))

    def apply_to(self, model: PeftModel) -> None:
        """The exact peft equivalent of s·B R̄ A: lora_B = B R̄, lora_A = A (same scale s)."""
        load_adapter_state(model, to_peft_lora(self.frozen, self.state, self.scale, prefix=PEFT_PREFIX))
