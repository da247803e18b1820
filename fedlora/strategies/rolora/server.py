"""RoLoRA's server part: the whole adapter goes down; the round's trained factor (+ head) comes back, averaged."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import scaling
from fedlora.adapters.state import AdapterState
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.strategy import ServerStrategy, shapes_of
from fedlora.server.validation import Shapes
from fedlora.strategies.rolora.math import average_with_error, upload_part


class RoLoRAServer(ServerStrategy):
    """Round t's uploads hold B (t odd) or A (t even) and the head; the global shared factor stays as it was."""

    def expected_upload(self, server_round: int, update: ClientUpdate) -> Shapes:
        return shapes_of(upload_part(self.state, server_round))

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        average, metrics = average_with_error(done.states(), weights, self.state, scaling(self.cfg.lora), done.number,
                                              self.measures_error(done.number))
        return {**self.state, **average}, metrics
