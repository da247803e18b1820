"""HetLoRA's server part: zero-pad the clients' factors to the global rank and average them with sparsity weights."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.state import AdapterState
from fedlora.server.mixed_ranks import MixedRankServer
from fedlora.server.round import Round
from fedlora.strategies.hetlora.math import aggregate_hetlora


class HetLoRAServer(MixedRankServer):
    """Each client then receives the global adapter's first r_k rank components."""

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        scales = self.client_scales(self.client_ranks(done))
        return aggregate_hetlora(done.states(), weights, scales, self.cfg.lora.rank, self.global_scale,
                                 self.measures_error(done.number))
