"""Sample-level DP on a client (``dp.mode = "sample"``): noise, budget, cumulative ε that survives restarts.

A node's accountant history lives in a JSON file in the node's state directory
(:func:`fedlora.client.node_store.node_state_dir`),
named after the run and the node, and is mirrored in ``context.state``. The file is the
source of truth: a restarted SuperNode or ClientApp process picks up the ε already spent.

Noise: ``dp.noise-multiplier`` when > 0, else σ calibrated so that the planned steps of the
whole run — rounds × expected participation (``fraction-train``) × local steps, plus the
steps of the strategy's setup phase (Fed-SB's gradient estimate, :mod:`fedlora.privacy.dp_gradient`), at sampling rate
q = batch-size / n — meet ``dp.target-epsilon``. Budget: when a target is set, a node
whose next round would take its cumulative ε past it refuses to train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedlora.client.node_store import node_label, node_state_dir
from fedlora.config import RunConfig
from fedlora.privacy.accounting import AccountantEntry, AccountantHistory, calibrate_noise, epsilon_after, planned_steps
from fedlora.privacy.sampling import sample_rate_of

STATE_KEY = "dp-history"


def history_path(context: Context, partition_id: int, run: str) -> Path:
    """The node's accountant file for the logical run ``run`` (:func:`~fedlora.client.node_store.run_label`)."""
    return node_state_dir(context.node_config) / f"privacy-{run}-{node_label(context, partition_id)}.json"


def load_history(context: Context, partition_id: int, run: str) -> AccountantHistory:
    """The node's history: its file when present, else the copy in ``context.state``."""
    path = history_path(context, partition_id, run)
    if path.exists():
        return AccountantHistory.load(path)
    if STATE_KEY in context.state.config_records:
        return AccountantHistory.from_record(context.state[STATE_KEY])
    return AccountantHistory()


def save_history(context: Context, partition_id: int, run: str, history: AccountantHistory) -> None:
    history.save(history_path(context, partition_id, run))
    context.state[STATE_KEY] = ConfigRecord(history.to_record())


@dataclass(frozen=True)
class RoundPlan:
    """This round's DP parameters for one node, and whether its budget allows the round."""

    noise_multiplier: float
    sample_rate: float
    epsilon_now: float
    epsilon_next: float
    refuse_reason: str = ""


def planned_client_steps(cfg: RunConfig, setup_steps: int) -> int:
    """DP steps a client is expected to take over the run: its training steps, plus the
    ``setup_steps`` of its strategy's setup phase (Fed-SB's private gradient estimate)."""
    return planned_steps(cfg.num_server_rounds, cfg.fraction_train, cfg.local_steps) + setup_steps


def plan_round(cfg: RunConfig, history: AccountantHistory, num_rows: int, steps: int, setup_steps: int) -> RoundPlan:
    """σ and q for a release of ``steps`` DP steps, the ε before and after it, and a refusal reason when over budget.

    ``setup_steps`` are the DP steps of the strategy's setup phase (they count in the calibration).
    """
    dp = cfg.dp
    q = sample_rate_of(cfg.batch_size, num_rows)
    sigma = dp.noise_multiplier
    if sigma <= 0:
        sigma = calibrate_noise(dp.target_epsilon, dp.delta, q, planned_client_steps(cfg, setup_steps), dp.accountant)
    now = history.epsilon(dp.delta, dp.accountant)
    after = epsilon_after(history, AccountantEntry(sigma, q, steps), dp.delta, dp.accountant)
    reason = ""
    if dp.target_epsilon > 0 and after > dp.target_epsilon:
        reason = f"privacy budget: this round would raise ε from {now:.3f} to {after:.3f} > dp.target-epsilon={dp.target_epsilon}"
    return RoundPlan(sigma, q, now, after, reason)
