"""FFA-LoRA's server part: B (+ head) travels and is averaged; A stays the run seed's."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlora.adapters.lora import LORA_A, scaling
from fedlora.adapters.state import AdapterState
from fedlora.adapters.transport import digest
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS, FFA_A_DIGEST
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.strategy import ServerStrategy, shapes_of
from fedlora.server.validation import Shapes
from fedlora.strategies.ffa.math import average_with_error, trainable_part


class FFAServer(ServerStrategy):
    """A stays the seeded initial A on every client (never sent); B (+ head) travels and is averaged."""

    checkpointed = ("frozen_A",)

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, initial_state)
        self.frozen_A = {k: v for k, v in initial_state.items() if k.endswith(LORA_A)}
        self._a_digest = digest(self.frozen_A)

    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        return {ARRAYS: trainable_part(self.state)}

    def client_config(self, server_round: int) -> dict[str, int | float | str]:
        return {FFA_A_DIGEST: self._a_digest}

    def expected_upload(self, server_round: int, update: ClientUpdate) -> Shapes:
        return shapes_of(trainable_part(self.state))

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        super().restore_state(arrays, values)
        self._a_digest = digest(self.frozen_A)

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        average, metrics = average_with_error(done.states(), weights, self.frozen_A, scaling(self.cfg.lora),
                                              self.measures_error(done.number))
        return {**self.frozen_A, **average}, metrics
