"""FedIT's server part: the global adapter is the average of the clients' factors."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import scaling
from fedlora.adapters.state import AdapterState
from fedlora.server.round import Round
from fedlora.server.strategy import ServerStrategy
from fedlora.strategies.fedavg.math import average_with_error


class FedAvgServer(ServerStrategy):
    """Clients train A and B; the server averages each (exact only when the clients' factors agree)."""

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        return average_with_error(done.states(), weights, scaling(self.cfg.lora), self.measures_error(done.number))
