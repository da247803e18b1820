"""HetLoRA's server part: zero-pad the clients' factors to the global rank and average them with sparsity weights."""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.state import AdapterState
from fedlora.server.mixed_ranks import MixedRankServer
from fedlora.server.round import Round
from fedlora.strategies.error_norms import factor_gram
from fedlora.strategies.hetlora.math import aggregate_hetlora


class HetLoRAServer(MixedRankServer):
    """Each client then receives the global adapter's first r_k rank components."""

    def observe_upload(self, key: str, tensor: np.ndarray) -> np.ndarray | None:
        """The Gram of each uploaded factor (B_kᵀB_k, A_kA_kᵀ) for the sparsity weights, while validation has it in
        the cache."""
        if key.endswith(LORA_B):
            return factor_gram(tensor, "left")
        return factor_gram(tensor, "right") if key.endswith(LORA_A) else None

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        scales = self.client_scales(self.client_ranks(done))
        return aggregate_hetlora(done.states(), weights, scales, self.cfg.lora.rank, self.global_scale,
                                 self.measures_error(done.number), [u.observed for u in done.updates])
