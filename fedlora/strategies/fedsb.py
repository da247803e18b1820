"""Fed-SB: federated LoRA-SB, where only the small r×r matrix R of ΔW = s·B R A trains.

B (d×r) and A (r×k) come from a truncated SVD of an initial full-gradient estimate and
are identical on all clients, so averaging R is exact:

    R̄ = Σ_k p_k R_k,   s·B R̄ A = Σ_k p_k s·B R_k A

Clients upload r² numbers per module, independent of d, k and the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import MessageType
from flwr.serverapp import Grid
from peft import PeftModel

from fedlora.adapters.lora import LORA_A, LORA_B, load_adapter_state, lora_modules
from fedlora.adapters.lorasb import to_peft_lora
from fedlora.config import RunConfig
from fedlora.strategies.base import ARRAYS, ClientUpdate, LoraStrategy
from fedlora.strategies.validation import Shapes

from fedlora.adapters.lorasb import LORASB_A, LORASB_B, LORASB_R, lorasb_modules
from fedlora.strategies.common import (
    AdapterState, average_uploads, check_same_keys, client_weights, ideal_factors, relative_error, weighted_average, weighted_sum,
)


def lorasb_init(G: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, R0, A) = (U_r, diag(σ_1..σ_r), V_rᵀ) from the SVD G = U Σ Vᵀ, in float64.

    B R0 A is the best rank-r approximation of G: ‖G − B R0 A‖²_F = Σ_{i>r} σ_i². R0 ≠ 0, so
    the adapter starts at ΔW0 = s·B R0 A, not at zero: the caller passes G already scaled to
    the update it wants to start from (e.g. −η·∇W / s for one gradient step of size η).
    """
    G = np.asarray(G, dtype=np.float64)
    if not 0 < r <= min(G.shape):
        raise ValueError(f"LoRA-SB rank {r} must be in 1..{min(G.shape)} for a {G.shape[0]}×{G.shape[1]} gradient")
    U, sigma, Vt = np.linalg.svd(G, full_matrices=False)
    return U[:, :r], np.diag(sigma[:r]), Vt[:r]


def lorasb_init_states(gradients: Mapping[str, np.ndarray], r: int) -> tuple[AdapterState, AdapterState]:
    """(fixed factors ``<m>.lorasb_B/A.weight``, initial ``<m>.lorasb_R.weight``) per module, float32."""
    frozen: AdapterState = {}
    initial: AdapterState = {}
    for m, G in gradients.items():
        B, R0, A = lorasb_init(G, r)
        frozen[m + LORASB_B] = B.astype(np.float32)
        frozen[m + LORASB_A] = A.astype(np.float32)
        initial[m + LORASB_R] = R0.astype(np.float32)
    return frozen, initial


def aggregate_fedsb(states: Sequence[AdapterState], weights: np.ndarray) -> AdapterState:
    """Σ_k p_k X_k for every uploaded tensor (the R factors and extras); uploads hold no B or A."""
    return average_uploads(states, weights, (LORASB_A, LORASB_B))


def fedsb_error(states: Sequence[AdapterState], weights: np.ndarray, frozen: AdapterState, scale: float) -> float:
    """‖s·B R̄ A − Σ_k p_k s·B R_k A‖_F / ‖Σ_k p_k s·B R_k A‖_F over all modules (zero up to rounding).

    R̄ is taken in float64 here, so the result measures the math, not float32 storage.
    """
    check_same_keys(states)

    def pairs():
        for m in lorasb_modules(frozen):
            B = np.asarray(frozen[m + LORASB_B], dtype=np.float64)
            A = np.asarray(frozen[m + LORASB_A], dtype=np.float64)
            Rs = [s[m + LORASB_R] for s in states]
            applied = (scale * (B @ weighted_sum(Rs, weights)), A)
            yield applied, ideal_factors([B @ np.asarray(R, dtype=np.float64) for R in Rs], [A] * len(Rs),
                                         [scale] * len(Rs), weights)

    return relative_error(pairs())


PEFT_PREFIX = "base_model.model."
FACTORS = "lorasb-factors"


class FedSB(LoraStrategy):
    """Fed-SB: an initial gradient round fixes B and A; afterwards only R (+ head) travels, averaged exactly.

    Round 0 asks the clients for full-weight gradients of the target modules on
    ``fedsb.init-batches`` batches (these bytes count in round 0), averages them to Ḡ and
    initialises B, R0, A from the truncated SVD of ``−(lr/s)·Ḡ``, so the starting update
    s·B R0 A is the best rank-r approximation of one gradient step. Each node receives B
    and A once, with its first training message; R̄ travels every round.
    """

    name = "fedsb"

    checkpointed = ("frozen",)  # the fixed B, A (``factors_sent`` is per run, not kept)

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, {})
        self.targets = [m[len(PEFT_PREFIX):] for m in lora_modules(initial_state)]
        self.dense_shapes = {m[len(PEFT_PREFIX):]: (initial_state[m + LORA_B].shape[0], initial_state[m + LORA_A].shape[1])
                             for m in lora_modules(initial_state)}
        self.head = {k[len(PEFT_PREFIX):]: v for k, v in initial_state.items() if not k.endswith((LORA_A, LORA_B))}
        self.scale = cfg.lora.alpha / cfg.lora.rank
        self.frozen: AdapterState = {}
        self.factors_sent: set[int] = set()

    def initialize(self, grid: Grid) -> dict[str, float]:
        nodes = self._sample(grid, self.cfg.fraction_train)
        messages, bytes_down = self._messages(nodes, 0, MessageType.TRAIN,
                                              {"fedsb-init": 1, "fedsb-targets": ",".join(self.targets)})
        updates, bytes_up, failures = self.collect(self._send(grid, messages))
        if not updates:
            raise RuntimeError(f"Fed-SB initialisation received no gradient estimates ({'; '.join(failures) or 'no replies'})")
        privacy = self.privacy_metrics(updates)
        if self.cfg.dp.mode == "user":  # B, A are released to every client: the mean gradient is a DP release too
            mean, user_dp = self.user_level_release([{m: u.state[m] for m in self.targets} for u in updates], 0)
            privacy.update(user_dp)
        else:
            weights = client_weights([u.num_examples for u in updates], self.cfg.weighting)
            mean = weighted_average([u.state for u in updates], weights, self.targets)
        step = -self.cfg.lr / self.scale
        self.frozen, initial_R = lorasb_init_states({m: step * g for m, g in mean.items()}, self.cfg.lora.rank)
        self.state = {**initial_R, **self.head}
        return {"bytes_up": float(bytes_up), "bytes_down": float(bytes_down), "num_clients": float(len(updates)),
                **privacy}

    def planned_releases(self) -> int:
        """The training rounds plus the gradient round that fixes B and A."""
        return self.cfg.num_server_rounds + 1

    def download(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        if not self.frozen:
            return {}
        records = {ARRAYS: self.state}
        if node_id not in self.factors_sent:
            records[FACTORS] = self.frozen
        return records

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        self.factors_sent.update(node_ids)

    def expected_upload(self, update: ClientUpdate) -> Shapes:
        """Before B, A exist: one dense d×k gradient per target module; afterwards R (r×r) and the head."""
        if not self.frozen:
            return dict(self.dense_shapes)
        return super().expected_upload(update)

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = [u.state for u in updates]
        return aggregate_fedsb(states, weights), {"agg_error": fedsb_error(states, weights, self.frozen, self.scale)}

    def apply_to(self, model: PeftModel) -> None:
        """The exact peft equivalent of s·B R̄ A: lora_B = B R̄, lora_A = A (same scale s)."""
        load_adapter_state(model, to_peft_lora(self.frozen, self.state, self.scale, prefix=PEFT_PREFIX))
