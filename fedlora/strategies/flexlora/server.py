"""FlexLoRA's server part: the global adapter is the rank-R truncated SVD of the clients' averaged updates."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.state import AdapterState
from fedlora.server.mixed_ranks import MixedRankServer
from fedlora.server.round import Round
from fedlora.strategies.flexlora.math import aggregate_flexlora


class FlexLoRAServer(MixedRankServer):
    """Each client then receives the first r_k singular components: the best rank-r_k approximation of ΔW̄."""

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        ranks = self.client_ranks(done)
        return aggregate_flexlora(done.states(), weights, self.client_scales(ranks), ranks, self.cfg.lora.rank,
                                  self.global_scale, self.measures_error(done.number))
