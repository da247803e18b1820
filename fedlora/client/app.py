"""The fedlora ClientApp: ``train`` and ``evaluate`` handlers over the Message API.

Each handler parses the run config, takes this node's training rows from its node config
(``partition-id`` + ``num-partitions`` of the run's dataset, or a site's own ``data-path``),
lets the strategy's client role (:mod:`fedlora.client.roles`) load the global state into
the process's cached model, and replies with an ArrayRecord and a MetricRecord carrying
``num-examples``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters.transport import to_record
from fedlora.client.loop import make_optimizer, train_steps
from fedlora.client.privacy import load_history, plan_round, save_history
from fedlora.client.roles import OnlyR, client_role
from fedlora.config import parse_config
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.privacy.accounting import AccountantEntry
from fedlora.privacy.sample_dp import dp_train_steps
from fedlora.strategies.base import ARRAYS, CONFIG, METRICS, STATUS
from fedlora.task import client_rows, load_task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global state for ``local-steps`` steps on this node's data."""
    cfg = parse_config(context.run_config)
    device = pick_device(cfg.device)
    rows, partition_id = client_rows(cfg, context.node_config)
    config = msg.content[CONFIG]
    server_round = int(config["server-round"])
    if int(config.get("fedsb-init", 0)):
        targets = str(config["fedsb-targets"]).split(",")
        gradients = OnlyR.initial_gradients(cfg, rows, targets, partition_id, device)
        metrics = MetricRecord({"num-examples": len(rows), "partition-id": partition_id})
        return Message(RecordDict({ARRAYS: to_record(gradients), METRICS: metrics}), reply_to=msg)
    history, plan = None, None
    if cfg.dp.mode == "sample":
        history = load_history(context, partition_id)
        plan = plan_round(cfg, history, len(rows))
        if plan.refuse_reason:
            metrics = MetricRecord({"num-examples": len(rows), "partition-id": partition_id, "epsilon": plan.epsilon_now})
            status = ConfigRecord({"refused": plan.refuse_reason})
            return Message(RecordDict({ARRAYS: ArrayRecord(), METRICS: metrics, STATUS: status}), reply_to=msg)
    role = client_role(cfg.strategy)
    model, params = role.prepare(cfg, msg.content, context, partition_id, server_round, device)
    task = load_task(cfg)
    client_seed = cfg.seed * 1_000_003 + server_round * 1_009 + partition_id
    torch.manual_seed(client_seed)  # dropout and any other global-RNG draw: reproducible per client and round
    generator = torch.Generator().manual_seed(client_seed)
    amp = autocast_dtype(cfg.precision, device)
    extra: dict[str, float] = {}
    if plan is None:
        loss = train_steps(model, rows, task.kind, task.pad_id, make_optimizer(params, cfg), cfg.local_steps,
                           cfg.batch_size, generator, device, amp)
    else:
        result = dp_train_steps(model, rows, task.kind, task.pad_id, lambda ps: make_optimizer(ps, cfg), cfg.local_steps,
                                cfg.batch_size, plan.noise_multiplier, cfg.dp.max_grad_norm, cfg.dp.grad_sample_mode,
                                generator, device, amp)
        history.add(AccountantEntry(plan.noise_multiplier, result.sample_rate, result.steps))
        save_history(context, partition_id, history)
        loss = result.mean_loss
        extra = {"epsilon": history.epsilon(cfg.dp.delta, cfg.dp.accountant), "noise-multiplier": plan.noise_multiplier}
    metrics = MetricRecord({"num-examples": len(rows), "train_loss": loss, "partition-id": partition_id,
                            **role.reply_metrics(cfg, partition_id), **extra})
    return Message(RecordDict({ARRAYS: to_record(role.upload(model)), METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global state on this node's local data."""
    cfg = parse_config(context.run_config)
    device = pick_device(cfg.device)
    rows, partition_id = client_rows(cfg, context.node_config)
    server_round = int(msg.content[CONFIG]["server-round"])
    model, _ = client_role(cfg.strategy).prepare(cfg, msg.content, context, partition_id, server_round, device)
    task = load_task(cfg)
    result = evaluate_rows(model, rows, task.kind, task.pad_id, 2 * cfg.batch_size, device,
                           autocast_dtype(cfg.precision, device))
    metrics = MetricRecord({"num-examples": len(rows), "partition-id": partition_id, **result})
    return Message(RecordDict({METRICS: metrics, ARRAYS: ArrayRecord()}), reply_to=msg)
