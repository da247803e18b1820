"""FedSA-LoRA's server part: Ā (+ head) goes down; A, B (+ head) come back and are averaged.

The global state is (Ā, B̄, head). B̄ makes the global model the server evaluates and saves
(:meth:`~fedlora.server.strategy.ServerStrategy.apply_to`, ``save_final`` as inherited);
it never travels down.
"""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import scaling
from fedlora.adapters.state import AdapterState
from fedlora.protocol import ARRAYS
from fedlora.server.round import Round
from fedlora.server.strategy import ServerStrategy
from fedlora.strategies.fedavg.math import average_with_error
from fedlora.strategies.fedsa.math import shared_part


class FedSAServer(ServerStrategy):
    """Send Ā and the head; average A, B and the head; B̄ stays on the server (global model only)."""

    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        return {ARRAYS: shared_part(self.state)}

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        return average_with_error(done.states(), weights, scaling(self.cfg.lora), self.measures_error(done.number))
