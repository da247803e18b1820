"""FFA-LoRA: A is random, frozen and identical on all clients; only B (and a head) trains.

    B̄ = Σ_k p_k B_k,   applied ΔW = s·B̄A = Σ_k p_k s·B_k A   (exact, by linearity)

Clients upload only the trainable part (every tensor except ``lora_A``), half of FedIT's
LoRA bytes; the server never needs A to aggregate, only to measure the error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlora.adapters.transport import digest
from fedlora.config import RunConfig
from fedlora.strategies.base import ARRAYS, ClientUpdate, LoraStrategy

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.strategies.common import (
    AdapterState, average_uploads, check_same_keys, ideal_factors, relative_error, weighted_sum,
)


def trainable_part(state: AdapterState) -> AdapterState:
    """What an FFA-LoRA client uploads: every tensor of ``state`` except the frozen ``lora_A``."""
    return {k: v for k, v in state.items() if not k.endswith(LORA_A)}


def aggregate_ffa(states: list[AdapterState], weights: np.ndarray) -> AdapterState:
    """Σ_k p_k X_k for every uploaded tensor (the B factors and extras); uploads hold no A."""
    return average_uploads(states, weights, (LORA_A,))


def ffa_error(states: list[AdapterState], weights: np.ndarray, frozen_A: AdapterState, scale: float) -> float:
    """‖s·B̄A − Σ_k p_k s·B_k A‖_F / ‖Σ_k p_k s·B_k A‖_F over all modules (zero up to rounding).

    B̄ is taken in float64 here, so the result measures the math, not float32 storage.

    ``frozen_A`` holds ``<module>.lora_A.weight`` for every module whose B was uploaded.
    """
    check_same_keys(states)
    modules = sorted(k[: -len(LORA_B)] for k in states[0] if k.endswith(LORA_B))

    def pairs():
        for m in modules:
            Bs = [s[m + LORA_B] for s in states]
            A = np.asarray(frozen_A[m + LORA_A], dtype=np.float64)
            yield (scale * weighted_sum(Bs, weights), A), ideal_factors(Bs, [A] * len(Bs), [scale] * len(Bs), weights)

    return relative_error(pairs())


class FFALoRA(LoraStrategy):
    """FFA-LoRA: A stays the seeded initial A on every client (never sent); B (+ head) travels and is averaged."""

    name = "ffa"
    checkpointed = ("frozen_A",)

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, initial_state)
        self.frozen_A = {k: v for k, v in initial_state.items() if k.endswith(LORA_A)}
        self._a_digest = digest(self.frozen_A)

    def download(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        return {ARRAYS: trainable_part(self.state)}

    def client_config(self, server_round: int) -> dict[str, int | float | str]:
        return {"ffa-a-digest": self._a_digest}

    def expected_upload(self, update: ClientUpdate) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in trainable_part(self.state).items()}

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        super().restore_state(arrays, values)
        self._a_digest = digest(self.frozen_A)

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = [u.state for u in updates]
        scale = self.cfg.lora.alpha / self.cfg.lora.rank
        new = {**self.frozen_A, **aggregate_ffa(states, weights)}
        return new, {"agg_error": ffa_error(states, weights, self.frozen_A, scale)}
