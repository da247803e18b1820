"""LoRA-FAIR's server part: FedIT's averages plus the ridge correction of B; clients start from (Ā, B̄ + ΔB*)."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.state import AdapterState
from fedlora.server.round import Round
from fedlora.server.strategy import ServerStrategy
from fedlora.strategies.lorafair.math import aggregate_lorafair


class LoraFairServer(ServerStrategy):
    """Reports ``residual_before`` (FedIT's error), ``residual_after`` and ``agg_error`` every round."""

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        return aggregate_lorafair(done.states(), weights, self.cfg.section("lorafair").lambda_,
                                  self.measures_error(done.number))
