"""The fedlora ClientApp: ``train`` and ``evaluate`` handlers over the Message API.

Each handler parses the run config, takes this node's training rows from its node config
(``partition-id`` + ``num-partitions`` of the run's dataset, or a site's own ``data-path``),
lets the strategy's registered client part (a :class:`~fedlora.client.role.ClientRole`)
load the global state into the process's cached model, and replies with an ArrayRecord
and a MetricRecord carrying ``num-examples``. Nothing here imports server code: the wire
names come from :mod:`fedlora.protocol`, the client part from the registry.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters.transport import to_record
from fedlora.client.faults import draw_fault
from fedlora.client.loop import make_optimizer, train_steps
from fedlora.client.node_store import run_label
from fedlora.client.privacy import RoundPlan, load_history, plan_round, save_history
from fedlora.client.role import ClientRole, Incoming
from fedlora.config import RunConfig
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.privacy.accounting import AccountantEntry, AccountantHistory
from fedlora.privacy.sample_dp import dp_train_steps
from fedlora.protocol import (
    ARRAYS, CONFIG, EPSILON, METRICS, NOISE_MULTIPLIER, NUM_EXAMPLES, PARTITION_ID, PHASE, REFUSED, SERVER_ROUND, SETUP,
    STATUS, STEPS, TRAIN_LOSS, TRAIN_SECONDS,
)
from fedlora.run_config import load_config
from fedlora.strategies.registry import spec_of
from fedlora.task import client_eval_rows, client_rows, load_task

app = ClientApp()


def node_device(cfg: RunConfig, context: Context) -> torch.device:
    """The device this node trains on: its node config's ``device`` (a site's own choice), else the run's."""
    return pick_device(str(context.node_config.get("device", cfg.device)))


def client_role(strategy: str) -> ClientRole:
    """The registered client part of ``strategy``."""
    return spec_of(strategy).client_role()


def _reply(msg: Message, arrays: ArrayRecord, metrics: dict, status: dict | None = None) -> Message:
    records = {ARRAYS: arrays, METRICS: MetricRecord(metrics)}
    if status:
        records[STATUS] = ConfigRecord(status)
    return Message(RecordDict(records), reply_to=msg)


def _privacy_plan(cfg: RunConfig, context: Context, run: str, partition_id: int, num_rows: int, steps: int,
                  role: ClientRole) -> tuple[AccountantHistory, RoundPlan] | None:
    """Under sample-level DP: the node's history and the plan for a release of ``steps`` DP steps."""
    if cfg.dp.mode != "sample":
        return None
    history = load_history(context, partition_id, run)
    return history, plan_round(cfg, history, num_rows, steps, role.setup_steps(cfg))


def _account(cfg: RunConfig, context: Context, run: str, partition_id: int, history: AccountantHistory,
             plan: RoundPlan, steps: int) -> dict[str, float]:
    """Record a release in the node's history (on disk first); the reply metrics that report it."""
    history.add(AccountantEntry(plan.noise_multiplier, plan.sample_rate, steps))
    save_history(context, partition_id, run, history)
    return {EPSILON: history.epsilon(cfg.dp.delta, cfg.dp.accountant), NOISE_MULTIPLIER: plan.noise_multiplier}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global state for ``local-steps`` steps on this node's data.

    A message of the setup phase (``phase = "setup"``) asks for the strategy's setup upload
    instead (Fed-SB's gradient estimate). Under ``dp.mode = "sample"`` every release — each
    round's update and a setup upload — is a DP mechanism accounted in the node's history; a
    node whose budget would be exceeded replies with a refusal instead.
    """
    cfg = load_config(context.run_config)
    device = node_device(cfg, context)
    rows, partition_id = client_rows(cfg, context.node_config)
    config = msg.content[CONFIG]
    run = run_label(context, config)
    server_round = int(config[SERVER_ROUND])
    identity = {NUM_EXAMPLES: len(rows), PARTITION_ID: partition_id}
    role = client_role(cfg.strategy)
    setup = config.get(PHASE) == SETUP
    steps = role.setup_steps(cfg) if setup else cfg.local_steps
    private = _privacy_plan(cfg, context, run, partition_id, len(rows), steps, role)
    if private and private[1].refuse_reason:
        return _reply(msg, ArrayRecord(), {**identity, EPSILON: private[1].epsilon_now}, {REFUSED: private[1].refuse_reason})
    if setup:
        upload = role.setup(cfg, rows, dict(config), partition_id, device, private[1] if private else None)
        extra = _account(cfg, context, run, partition_id, *private, steps) if private else {}
        return _reply(msg, to_record(upload), {**identity, **extra})
    fault = draw_fault(cfg.faults, cfg.seed, server_round, partition_id)
    fault.check_alive(server_round, partition_id)
    incoming = Incoming(cfg, msg.content, context, partition_id, server_round, device)
    model, params = role.prepare(incoming)
    task = load_task(cfg)
    client_seed = cfg.seed * 1_000_003 + server_round * 1_009 + partition_id
    torch.manual_seed(client_seed)  # dropout and any other global-RNG draw: reproducible per client and round
    generator = torch.Generator().manual_seed(client_seed)
    amp = autocast_dtype(cfg.precision, device)
    extra: dict[str, float] = {}
    started = time.monotonic()
    if private is None:
        loss = train_steps(model, rows, task.kind, task.pad_id, make_optimizer(params, cfg), cfg.local_steps,
                           cfg.batch_size, generator, device, amp)
        steps = cfg.local_steps
    else:
        history, plan = private
        result = dp_train_steps(model, rows, task.kind, task.pad_id, lambda ps: make_optimizer(ps, cfg), cfg.local_steps,
                                cfg.batch_size, plan.noise_multiplier, cfg.dp.max_grad_norm, cfg.dp.grad_sample_mode,
                                generator, device, amp)
        extra = _account(cfg, context, run, partition_id, history, plan, result.steps)
        loss, steps = result.mean_loss, result.steps
    metrics = {**identity, TRAIN_LOSS: loss, TRAIN_SECONDS: time.monotonic() - started, STEPS: steps,
               **role.reply_metrics(cfg, partition_id), **extra, **fault.reply_metrics(cfg.round_timeout)}
    return _reply(msg, to_record(fault.apply(role.upload(model, incoming))), metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global state (as the strategy's client part prepares it: a personalised
    model for FedSA-LoRA) on this node's local evaluation rows (``dataset.local-eval-fraction``)."""
    cfg = load_config(context.run_config)
    device = node_device(cfg, context)
    rows, partition_id = client_eval_rows(cfg, context.node_config)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    model = client_role(cfg.strategy).prepare_evaluation(Incoming(cfg, msg.content, context, partition_id, server_round,
                                                                  device))
    task = load_task(cfg)
    result = evaluate_rows(model, rows, task.kind, task.pad_id, 2 * cfg.batch_size, device,
                           autocast_dtype(cfg.precision, device))
    metrics = MetricRecord({NUM_EXAMPLES: len(rows), PARTITION_ID: partition_id, **result})
    return Message(RecordDict({METRICS: metrics, ARRAYS: ArrayRecord()}), reply_to=msg)
