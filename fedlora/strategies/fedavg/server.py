"""FedIT's server part: the global adapter is the average of the clients' factors."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import scaling
from fedlora.adapters.state import AdapterState
from fedlora.server.round import Round
from fedlora.server.strategy import ServerStrategy
from fedlora.strategies.fedavg.math import fedavg_error, fedavg_states


class FedAvgServer(ServerStrategy):
    """Clients train A and B; the server averages each (exact only when the clients' factors agree)."""

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = done.states()
        return fedavg_states(states, weights), {"agg_error": fedavg_error(states, weights, scaling(self.cfg.lora))}
