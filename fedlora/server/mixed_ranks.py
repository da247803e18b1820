"""Server machinery for strategies with a global adapter of rank R and clients of their own ranks r_k ≤ R.

The global adapter is a LoRA of rank R = ``lora.rank`` and scale s_R = α/R, ordered so that
its first r components are what a rank-r client should hold (FlexLoRA: singular vectors by
singular value; HetLoRA: the rank dimension as is). A node receives the global factors at
scale 1 (B·s_R, A), cut to its rank once the server knows it (from the ``rank`` its replies
announce), else whole; the client part :class:`fedlora.client.role.OwnRank` cuts and rescales.
"""

from __future__ import annotations

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules, scaling
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS, RANK
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.strategy import ServerStrategy, shapes_of
from fedlora.server.validation import Shapes, announced_rank


def at_scale_one(state: AdapterState, scale: float, rank: int) -> AdapterState:
    """The first ``rank`` components of a LoRA state of scale ``scale``, as factors of scale 1: (s·B[:, :r], A[:r])."""
    out = dict(state)
    for m in lora_modules(state):
        out[m + LORA_B] = (scale * state[m + LORA_B][:, :rank]).astype(np.float32)
        out[m + LORA_A] = np.ascontiguousarray(state[m + LORA_A][:rank])
    return out


class MixedRankServer(ServerStrategy):
    """The downloads, upload shapes and client scales of a rank-R global adapter with rank-r_k clients."""

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, initial_state)
        self.global_scale = scaling(cfg.lora)
        #: node id -> the rank its replies announce (per run: node ids change, so not checkpointed)
        self.node_ranks: dict[int, int] = {}

    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        return {ARRAYS: at_scale_one(self.state, self.global_scale, self.node_ranks.get(node_id, self.cfg.lora.rank))}

    def expected_upload(self, server_round: int, update: ClientUpdate) -> Shapes:
        """The extras plus, per module, A (r_k×k) and B (d×r_k) at the rank r_k the client announces."""
        r = announced_rank(update.metrics, self.cfg.lora.allowed_ranks)
        shapes = shapes_of(self.state)
        for m in lora_modules(self.state):
            shapes[m + LORA_A] = (r, self.state[m + LORA_A].shape[1])
            shapes[m + LORA_B] = (self.state[m + LORA_B].shape[0], r)
        return shapes

    def client_ranks(self, done: Round) -> list[int]:
        """The r_k of the round's updates (and remember each node's, for its next download)."""
        ranks = [int(u.metrics[RANK]) for u in done.updates]
        self.node_ranks.update({u.node_id: r for u, r in zip(done.updates, ranks)})
        return ranks

    def client_scales(self, ranks: list[int]) -> list[float]:
        return [self.cfg.lora.alpha / r for r in ranks]
