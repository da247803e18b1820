"""What a strategy's server part implements: the global state and how replies change it.

A server part never touches Flower Messages; the round loop (:mod:`fedlora.server.rounds`)
sends what :meth:`ServerStrategy.downloads` returns, validates every reply against
:meth:`ServerStrategy.expected_upload`, and hands the valid ones to
:meth:`ServerStrategy.aggregate` with their weights p_k. A round:

    downloads → clients train → expected_upload (validation) → aggregate → state → evaluation

A strategy with a phase before round 1 (``Capabilities.setup_round``) returns its
instructions from :meth:`setup_config`; the loop averages the setup replies with
:meth:`setup_average` (a linear average, so user-level DP can wrap it) and passes the
average to :meth:`finish_setup`.

User-level DP (:class:`fedlora.privacy.user_level.UserLevelDP`) wraps a server part whose
capabilities say linear, and overrides :meth:`aggregate` and :meth:`setup_average` only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel

from fedlora.adapters.lora import load_adapter_state
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.validation import Shapes
from fedlora.strategies.common import weighted_average
from fedlora.task import save_final_adapter


def prefixed(prefix: str, state: AdapterState) -> AdapterState:
    """``state`` with every name prefixed (to keep several states apart in one checkpoint)."""
    return {prefix + k: v for k, v in state.items()}


def unprefixed(prefix: str, arrays: AdapterState, keys: list[str]) -> AdapterState:
    """The state :func:`prefixed` stored under ``prefix``, in the order of ``keys``."""
    return {k: arrays[prefix + k] for k in keys}


def shapes_of(state: AdapterState) -> Shapes:
    return {k: tuple(v.shape) for k, v in state.items()}


class ServerStrategy(ABC):
    """The server part of a strategy. Subclasses implement :meth:`aggregate` (pure math) and,
    where they differ from "send and receive the whole global adapter", the hooks below."""

    #: AdapterState attributes that the checkpoint keeps, besides ``state`` (e.g. fixed factors)
    checkpointed: tuple[str, ...] = ()

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        """``initial_state`` is the server model's adapter as injected: A from the run seed, B = 0, the head."""
        self.cfg = cfg
        self.state: AdapterState = initial_state

    def measures_error(self, server_round: int) -> bool:
        """Whether ``server_round`` reports ``agg_error`` (``metrics.agg-error-every``: every N-th round, 0 = never)."""
        every = self.cfg.metrics.agg_error_every
        return every > 0 and server_round % every == 0

    # ----- a training round ----------------------------------------------------------------
    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        """Array records node ``node_id`` receives this round, by record name (default: the global adapter)."""
        return {ARRAYS: self.state}

    def client_config(self, server_round: int) -> dict[str, int | float | str]:
        """Extra per-round instructions for every client."""
        return {}

    def expected_upload(self, server_round: int, update: ClientUpdate) -> Shapes:
        """Tensor name -> shape this client must upload (default: the whole global adapter).

        Raise :class:`~fedlora.server.validation.InvalidUpdate` when the reply itself says it
        cannot fit (e.g. an announced rank that is not configured).
        """
        return shapes_of(self.state)

    def observe_upload(self, key: str, tensor: np.ndarray) -> np.ndarray | None:
        """Something :meth:`aggregate` will need of one uploaded tensor, made while validation has it in the cache
        (kept in :attr:`~fedlora.server.round.ClientUpdate.observed` unless None; default: nothing). ``aggregate``
        must compute it itself for an update whose ``observed`` lacks it (a rescaled update has none)."""
        return None

    @abstractmethod
    def aggregate(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        """The new global state and the strategy's metrics (``agg_error`` …) from the round's valid updates.

        ``weights`` are the p_k of ``done.updates`` (they sum to 1). The loop stores the
        returned state in ``self.state``; other server state (merges, fixed factors) is the
        strategy's own.
        """

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        """Called with the nodes that replied successfully (they now hold this round's downloads)."""

    def skipped(self, server_round: int) -> None:
        """Called when a training round aggregated nothing; the global state stays as it was."""

    # ----- a phase before round 1 ------------------------------------------------------------
    def setup_config(self) -> dict[str, int | float | str] | None:
        """Instructions of the setup phase, or None when the strategy has none (the default)."""
        return None

    def setup_expected_upload(self, update: ClientUpdate) -> Shapes:
        """Tensor name -> shape of a setup reply."""
        raise RuntimeError(f"{type(self).__name__} has no setup phase")

    def setup_average(self, done: Round, weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        """Σ_k p_k X_k over the setup uploads — the one linear release of the setup phase — and its metrics."""
        return weighted_average(done.states(), weights, done.updates[0].state.keys()), {}

    def finish_setup(self, average: AdapterState) -> None:
        """Initialise the global state from the setup phase's average."""
        raise RuntimeError(f"{type(self).__name__} has no setup phase")

    # ----- checkpoint -------------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[AdapterState, dict[str, Any]]:
        """Arrays (unique names) and JSON-able values that let :meth:`restore_state` continue this run.

        ``state`` and every attribute named in ``checkpointed``, each under its own name
        prefix. Subclasses with other server state extend both parts (call ``super()``).
        Node-specific bookkeeping (who received what) is not kept, since node ids change
        between runs: a resumed run treats every node as having received nothing.
        """
        arrays: AdapterState = {}
        values: dict[str, Any] = {}
        for name in ("state", *self.checkpointed):
            arrays.update(prefixed(f"{name}/", getattr(self, name)))
            values[f"{name}_keys"] = list(getattr(self, name))
        return arrays, values

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        """Continue from what :meth:`checkpoint_state` wrote (on a freshly built strategy)."""
        for name in ("state", *self.checkpointed):
            setattr(self, name, unprefixed(f"{name}/", arrays, values[f"{name}_keys"]))

    # ----- the server's model -------------------------------------------------------------
    def apply_to(self, model: PeftModel) -> None:
        """Load the current global model into the server's adapted model (for evaluation)."""
        load_adapter_state(model, self.state)

    def save_final(self, model: PeftModel, path: Path) -> None:
        """Write the final global adapter in the portable format (:mod:`fedlora.adapters.export`) that
        ``peft.PeftModel.from_pretrained`` and ``AutoPeftModelFor…`` load; ``model`` is the server's model, on a
        skeleton of the base when the server evaluates nothing (:func:`fedlora.task.skeleton_model`)."""
        self.apply_to(model)
        save_final_adapter(model, path, self.cfg)
