"""User-level DP as a wrapper around any strategy whose capabilities say linear (DP-FedAvg).

The pattern of Flower's server-side DP wrappers: :class:`UserLevelDP` delegates everything
to the wrapped server part and changes only what the server releases. In a round with m
valid updates, each client's update Δ_k = upload_k − global is clipped jointly to norm C,
the wrapped strategy aggregates the clipped uploads ``global + clip(Δ_k, C)`` with
uniform weights 1/m — for a linear strategy that is ``global + (1/m) Σ_k clip(Δ_k, C)`` —
and Gaussian noise N(0, (σC/m)²) is added to every uploaded tensor of the result. The
wrapped strategy's own metrics (``agg_error``, bytes) are reported as usual, on the
clipped updates. A setup phase's average (Fed-SB's mean gradient) is released the same
way, with the raw uploads as the Δ_k.

Each release is one subsampled Gaussian mechanism of rate q = m / N (N nodes online),
composed by the accountant into the cumulative user-level ``epsilon``. σ is
``dp.noise-multiplier``, or calibrated so that the planned releases (one per round, plus
the setup phase's) meet ``dp.target-epsilon``; the noise comes from an RNG of
(seed, round).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel

from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.privacy.accounting import calibrate_noise
from fedlora.privacy.user_dp import clip_update, noisy_average, user_level_epsilon
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.strategy import ServerStrategy
from fedlora.server.validation import Shapes


class UserLevelDP(ServerStrategy):
    """``inner`` with each round's release clipped per client and noised (see the module docstring)."""

    def __init__(self, inner: ServerStrategy, cfg: RunConfig, setup_round: bool) -> None:
        self.inner = inner
        self.cfg = cfg
        self.releases_planned = cfg.num_server_rounds + int(setup_round)
        #: one (σ, q, 1) entry per release, composed by the accountant
        self.history: list[tuple[float, float, int]] = []

    @property
    def state(self) -> AdapterState:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value: AdapterState) -> None:
        self.inner.state = value

    def noise_multiplier(self) -> float:
        dp = self.cfg.dp
        return dp.noise_multiplier or calibrate_noise(dp.target_epsilon, dp.delta, self.cfg.fraction_train,
                                                      self.releases_planned, dp.accountant)

    def _account(self, done: Round, sigma: float) -> dict[str, float]:
        m = len(done.updates)
        self.history.append((sigma, m / max(done.population, m), 1))
        dp = self.cfg.dp
        return {"epsilon": user_level_epsilon(self.history, dp.delta, dp.accountant), "noise-multiplier": sigma}

    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        """The wrapped aggregate of ``global + clip(Δ_k, C)`` at weights 1/m, plus N(0, (σC/m)²) on every uploaded tensor."""
        dp, m = self.cfg.dp, len(done.updates)
        current = self.inner.state
        clipped = []
        for update in done.updates:
            delta = {k: np.asarray(v, dtype=np.float64) - current[k] for k, v in update.state.items()}
            kept = clip_update(delta, dp.max_grad_norm)
            clipped.append(replace(update, state={k: (current[k] + kept[k]).astype(np.float32) for k in kept}))
        state, metrics = self.inner.aggregate(replace(done, updates=clipped), np.full(m, 1.0 / m))
        sigma = self.noise_multiplier()
        rng = np.random.default_rng((self.cfg.seed, done.number))
        std = sigma * dp.max_grad_norm / m
        noisy = dict(state)
        for key in done.updates[0].state:
            noisy[key] = (state[key] + rng.normal(0.0, std, size=state[key].shape)).astype(np.float32)
        return noisy, {**metrics, **self._account(done, sigma)}

    def setup_average(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        """(1/m) Σ_k clip(X_k, C) + N(0, (σC/m)²) over the setup uploads X_k: the setup phase's release."""
        sigma = self.noise_multiplier()
        average = noisy_average(done.states(), self.cfg.dp.max_grad_norm, sigma,
                                np.random.default_rng((self.cfg.seed, done.number)))
        return average, self._account(done, sigma)

    # ----- everything else is the wrapped strategy's ----------------------------------------
    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        return self.inner.downloads(server_round, node_id)

    def client_config(self, server_round: int) -> dict[str, int | float | str]:
        return self.inner.client_config(server_round)

    def expected_upload(self, server_round: int, update: ClientUpdate) -> Shapes:
        return self.inner.expected_upload(server_round, update)

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        self.inner.delivered(server_round, node_ids)

    def skipped(self, server_round: int) -> None:
        self.inner.skipped(server_round)

    def setup_config(self) -> dict[str, int | float | str] | None:
        return self.inner.setup_config()

    def setup_expected_upload(self, update: ClientUpdate) -> Shapes:
        return self.inner.setup_expected_upload(update)

    def finish_setup(self, average: AdapterState) -> None:
        self.inner.finish_setup(average)

    def checkpoint_state(self) -> tuple[AdapterState, dict[str, Any]]:
        arrays, values = self.inner.checkpoint_state()
        return arrays, {**values, "user_dp_history": [list(h) for h in self.history]}

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        self.inner.restore_state(arrays, values)
        self.history = [(float(s), float(q), int(n)) for s, q, n in values["user_dp_history"]]

    def apply_to(self, model: PeftModel) -> None:
        self.inner.apply_to(model)

    def save_final(self, model: PeftModel, path: Path) -> None:
        self.inner.save_final(model, path)
