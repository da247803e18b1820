"""The fedlora ClientApp: ``train`` and ``evaluate`` handlers over the Message API.

Each handler parses the run config, takes this node's training rows from its node config
(``partition-id`` + ``num-partitions`` of the run's dataset, or a site's own ``data-path``), loads the global adapter
from the message into the process's cached model, and replies with an ArrayRecord and
a MetricRecord carrying ``num-examples``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters.lora import adapter_state, load_adapter_state
from fedlora.adapters.transport import from_record, to_record
from fedlora.client.loop import make_optimizer, train_steps
from fedlora.config import RunConfig, parse_config
from fedlora.device import autocast_dtype, pick_device
from fedlora.evaluation import evaluate_rows
from fedlora.strategies.base import ARRAYS, CONFIG, METRICS
from fedlora.task import adapted_model, client_rows, load_task

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, torch.device, torch.nn.Module, list[dict], int]:
    cfg = parse_config(context.run_config)
    device = pick_device(cfg.device)
    rows, partition_id = client_rows(cfg, context.node_config)
    model = adapted_model(cfg, str(device))
    load_adapter_state(model, from_record(msg.content[ARRAYS]))
    return cfg, device, model, rows, partition_id


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``local-steps`` steps on this node's partition."""
    cfg, device, model, rows, partition_id = _setup(msg, context)
    server_round = int(msg.content[CONFIG]["server-round"])
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + server_round * 1_009 + partition_id)
    params = [p for p in model.parameters() if p.requires_grad]
    task = load_task(cfg)
    loss = train_steps(model, rows, task.kind, task.pad_id, make_optimizer(params, cfg), cfg.local_steps,
                       cfg.batch_size, generator, device, autocast_dtype(cfg.precision, device))
    metrics = MetricRecord({"num-examples": len(rows), "train_loss": loss, "partition-id": partition_id})
    reply = RecordDict({ARRAYS: to_record(adapter_state(model)), METRICS: metrics})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's local partition."""
    cfg, device, model, rows, partition_id = _setup(msg, context)
    task = load_task(cfg)
    result = evaluate_rows(model, rows, task.kind, task.pad_id, 2 * cfg.batch_size, device,
                           autocast_dtype(cfg.precision, device))
    metrics = MetricRecord({"num-examples": len(rows), "partition-id": partition_id, **result})
    return Message(RecordDict({METRICS: metrics, ARRAYS: ArrayRecord()}), reply_to=msg)
