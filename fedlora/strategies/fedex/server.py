"""FedEx-LoRA's server part: FedIT's averages as the global adapter, the exact residual merged into every base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from peft import PeftModel

from fedlora.adapters.lora import LORA_A, LORA_B, load_adapter_state, lora_modules, scaling
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.server.merges import MergingServer
from fedlora.server.round import Round
from fedlora.strategies.fedavg.math import fedavg_states
from fedlora.strategies.fedex.math import residual_merge


class FedExServer(MergingServer):
    """The global state is (Ā, B̄, head); each round's residual s·R is merged into the server's and every node's base.

    A node receives, with its next training message, every residual it has not yet seen
    (``merge-<round>`` records). The merges' factored total plus s·B̄Ā is the final adapter.
    """

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, initial_state)
        self.scale = scaling(cfg.lora)

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = done.states()
        average = fedavg_states(states, weights)
        merge, factors, metrics = residual_merge(states, weights, average, self.scale, self.measures_error(done.number))
        self.log.record(done.number, merge, factors)
        return average, {**metrics, "dense_modules": float(sum(1 for m in lora_modules(states[0]) if m + LORA_A not in merge))}

    def apply_to(self, model: PeftModel) -> None:
        self.log.bring(model)
        load_adapter_state(model, self.state)

    def save_final(self, model: PeftModel, path: Path) -> None:
        """Σ of every residual plus s·B̄Ā as one exact LoRA (scale 1), with the head."""
        if not any(self.log.merges.values()):
            return super().save_final(model, path)
        adapter = {k: (self.scale * v).astype(np.float32) if k.endswith(LORA_B) else v for k, v in self.state.items()}
        self.log.save_with(self.cfg, adapter, path)
