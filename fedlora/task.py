"""What server and clients share for one run: the task data, the tokenizer, the adapted model.

Everything here is cached per process, so a ClientApp process that handles many rounds
(simulation) loads the base model and the dataset once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any, Mapping

import datasets
import torch
from flwr.common import log
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.process_cache import process_cache
from fedlora.adapters.export import save_portable
from fedlora.adapters.lora import DEFAULT_ADAPTER, cached_lora_model, inject_lora
from fedlora.config import ConfigError, DatasetConfig, LoraConfig, PartitionConfig, RunConfig
from fedlora.data.partition import check_partition_id, partition_indices
from fedlora.data.sources import TaskData, client_file, load_site_data, load_task_data
from fedlora.data.tokenize import encode_classification, encode_instruction
from fedlora.device import autocast_dtype, device_capacity, visible_gpus
from fedlora.models.checkpointing import set_gradient_checkpointing
from fedlora.models.loading import load_base_model, load_tokenizer, skeleton_base_model
from fedlora.models.memory import GIB, MemoryEstimate, Workload, estimate, facts_of, knobs_that_fit, refusal, size
from fedlora.models.portable import portable_id
from fedlora.models.precision import base_spec
from fedlora.models.registry import check_model_task


@dataclass(frozen=True)
class Task:
    data: TaskData
    tokenizer: PreTrainedTokenizerBase

    @property
    def kind(self) -> str:
        return self.data.task

    @property
    def num_labels(self) -> int:
        return len(self.data.labels) if self.kind == "classification" else 0

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode(self, split: datasets.Dataset, max_length: int) -> list[dict]:
        if self.kind == "classification":
            return encode_classification(self.tokenizer, split, max_length)
        return encode_instruction(self.tokenizer, split, max_length)


def load_task(cfg: RunConfig) -> Task:
    """Dataset (split under the run seed) and tokenizer for this run."""
    return _load_task(cfg.dataset, cfg.seed, cfg.model.name)


@process_cache(maxsize=2)
def _load_task(dataset: DatasetConfig, seed: int, model_name: str) -> Task:
    data = load_task_data(dataset, seed)
    check_model_task(model_name, data.task)
    return Task(data=data, tokenizer=load_tokenizer(model_name))


def adapted_model(cfg: RunConfig, device: str, lora: LoraConfig | None = None, variant: str = "shared") -> PeftModel:
    """The base model (held as ``model.*`` says) with the adapter of ``lora`` active; A drawn from the run seed.

    One base per process, spec and variant stays resident
    (:class:`~fedlora.adapters.lora.SharedBase`): the clients a process serves share it, and a
    client of another rank (``lora`` overrides the run's LoRA shape) swaps the adapter on it;
    ``variant`` separates bases whose weights a strategy changes (FLoRA merges). Before the base
    first loads, the client's memory is estimated, logged and checked (:func:`check_memory`).
    Layers checkpoint when ``model.gradient-checkpointing`` is on.
    """
    task, lora, where = load_task(cfg), lora or cfg.lora, torch.device(device)
    check_memory(cfg, where, lora, training=True)
    base = cached_lora_model(cfg.model.name, task.kind, task.num_labels, base_spec(cfg.model, where), variant)
    model = base.use(lora, cfg.seed)
    set_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
    return model


def server_model(cfg: RunConfig, device: str) -> PeftModel:
    """The server's own adapted model for one run (not shared: strategies may merge into its base), the base held
    as ``model.*`` says, on ``device``; a server that evaluates nothing needs only :func:`skeleton_model`."""
    task, where = load_task(cfg), torch.device(device)
    check_memory(cfg, where, cfg.lora, training=False)
    base = load_base_model(cfg.model.name, task.kind, task.num_labels, base_spec(cfg.model, where))
    return inject_lora(base, cfg.lora, task.kind, cfg.seed)


def skeleton_model(cfg: RunConfig, lora: LoraConfig | None = None) -> PeftModel:
    """The run's adapted model on a meta-device skeleton of the base: real float32 adapter tensors (the seeded
    initial state, as every client's), not a byte of base weights
    (:func:`~fedlora.models.loading.skeleton_base_model`)."""
    task = load_task(cfg)
    skeleton = skeleton_base_model(cfg.model.name, task.kind, task.num_labels)
    return inject_lora(skeleton, lora or cfg.lora, task.kind, cfg.seed)


def save_final_adapter(model: PeftModel, path: Path, cfg: RunConfig) -> None:
    """Write ``model``'s adapter as the run's portable final adapter (:mod:`fedlora.adapters.export`)."""
    task = load_task(cfg)
    save_portable(model, path, portable_id(cfg.model.name), task.data.labels if task.kind == "classification" else ())


def memory_fit(cfg: RunConfig, device: torch.device, lora: LoraConfig,
               training: bool) -> tuple[MemoryEstimate, str, str | None]:
    """(the estimate, it as one line, and the refusal that names the knobs that would make it fit or None) for a client
    training ``lora`` (or, not ``training``, the server's evaluating model) on ``device``
    (:mod:`fedlora.models.memory`), against the device's memory or ``memory.limit-gb``."""
    task, spec = load_task(cfg), base_spec(cfg.model, device)
    facts = facts_of(skeleton_model(cfg, lora), DEFAULT_ADAPTER, causal=task.kind == "instruction")
    amp = autocast_dtype(cfg.precision, device)
    dp = cfg.dp.grad_sample_mode if cfg.dp.mode == "sample" else "none"
    work = Workload(weight_bytes=spec.dtype.itemsize, activation_bytes=(amp or spec.dtype).itemsize,
                    quantization=spec.quantization, batch=cfg.batch_size if training else 64,
                    length=cfg.dataset.max_length, checkpointing=cfg.model.gradient_checkpointing and training,
                    optimizer=cfg.optimizer, dp=dp, training=training)
    estimated = estimate(facts, work)
    limited = cfg.memory.limit_gb > 0
    capacity = cfg.memory.limit_gb * GIB if limited else device_capacity(device, spread=spec.spread)
    who = "client" if training else "server"
    line = f"{who} memory estimate on {device}: {estimated.describe()} of {size(capacity)}"
    if estimated.total <= capacity:
        return estimated, line, None
    spread = None
    if not limited and device.type == "cuda" and not spec.spread and len(visible_gpus()) > 1:
        spread = device_capacity(device, spread=True)
    return estimated, line, refusal(who, str(device), estimated, capacity, limited,
                                    knobs_that_fit(facts, work, capacity, spread))


@process_cache(maxsize=8)
def check_memory(cfg: RunConfig, device: torch.device, lora: LoraConfig, training: bool) -> MemoryEstimate:
    """Log :func:`memory_fit`'s estimate (once per process and setting) and return it; :class:`ConfigError` with
    its refusal when the model does not fit."""
    estimated, line, refused = memory_fit(cfg, device, lora, training)
    log(INFO, "[fedlora] %s", line)
    if refused:
        raise ConfigError(refused)
    return estimated


def partition_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> list[dict]:
    """One client's encoded training rows."""
    return _partition_rows(cfg.dataset, cfg.seed, cfg.model.name, cfg.partition, partition_id, num_partitions)


@process_cache(maxsize=4)
def _partition_table(dataset: DatasetConfig, seed: int, model_name: str, partition: PartitionConfig,
                     num_partitions: int) -> tuple[tuple[int, ...], ...]:
    """Row indices of every partition, computed once per process and partitioning (not once per client)."""
    task = _load_task(dataset, seed, model_name)
    return tuple(tuple(rows) for rows in partition_indices(task.data.train, partition, num_partitions, seed))


@process_cache(maxsize=16)
def _partition_rows(dataset: DatasetConfig, seed: int, model_name: str, partition: PartitionConfig,
                    partition_id: int, num_partitions: int) -> list[dict]:
    check_partition_id(partition_id, num_partitions)
    task = _load_task(dataset, seed, model_name)
    rows = _partition_table(dataset, seed, model_name, partition, num_partitions)[partition_id]
    return task.encode(task.data.train.select(rows), dataset.max_length)


def site_rows(cfg: RunConfig, data_path: str) -> list[dict]:
    """A site's (or simulated client's) own training rows from a local file (JSONL/CSV/parquet with the task's columns).

    The file is read with the run's column settings (``dataset.text-column`` …) and, for
    classification, mapped onto the run's label set (``dataset.labels`` when declared: then
    ``dataset.name`` is not read); labels outside it are an error.
    """
    return _site_rows(cfg.dataset, cfg.seed, cfg.model.name, data_path)


@process_cache(maxsize=4)
def _site_rows(dataset: DatasetConfig, seed: int, model_name: str, data_path: str) -> list[dict]:
    task = _load_task(dataset, seed, model_name)
    site = load_site_data(dataset, data_path, task.kind, task.data.labels)
    return task.encode(site, dataset.max_length)


def _node_rows(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[list[dict], int]:
    """All of this node's rows and its partition id (−1 for a site with its own data file).

    Node config either names ``data-path`` (a site's own file) or ``partition-id`` and
    ``num-partitions`` (simulation sets these two itself): the partition of the run's dataset,
    or with ``dataset.client-files`` the partition-id-th of those files (a simulated site's own file).
    """
    if "data-path" in node_config:
        return site_rows(cfg, str(node_config["data-path"])), int(node_config.get("partition-id", -1))
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            f"node config needs 'partition-id' and 'num-partitions', or 'data-path'; got {dict(node_config)}"
        )
    partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if cfg.dataset.client_files:
        check_partition_id(partition_id, num_partitions)
        return site_rows(cfg, str(client_file(cfg.dataset, partition_id, num_partitions))), partition_id
    return partition_rows(cfg, partition_id, num_partitions), partition_id


def local_split(rows: list[dict], fraction: float, seed: int, partition_id: int) -> tuple[list[dict], list[dict]]:
    """(training rows, local evaluation rows): ``ceil(fraction · n)`` rows held out, chosen under (seed, partition).

    ``fraction = 0`` holds nothing out (the evaluation rows are the training rows). At least
    one row always stays for training.
    """
    if fraction == 0:
        return rows, rows
    held = min(len(rows) - 1, math.ceil(fraction * len(rows)))
    order = random.Random(f"local-eval/{seed}/{partition_id}").sample(range(len(rows)), len(rows))
    kept = set(order[held:])
    return [r for i, r in enumerate(rows) if i in kept], [r for i, r in enumerate(rows) if i not in kept]


def client_rows(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[list[dict], int]:
    """This node's training rows and its partition id (without its ``dataset.local-eval-fraction`` share)."""
    rows, partition_id = _node_rows(cfg, node_config)
    return local_split(rows, cfg.dataset.local_eval_fraction, cfg.seed, partition_id)[0], partition_id


def client_eval_rows(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[list[dict], int]:
    """The rows this node evaluates on: its held-out ``dataset.local-eval-fraction`` share (else its training rows)."""
    rows, partition_id = _node_rows(cfg, node_config)
    return local_split(rows, cfg.dataset.local_eval_fraction, cfg.seed, partition_id)[1], partition_id


def heldout_rows(cfg: RunConfig) -> list[dict]:
    """The encoded held-out split (server evaluation only)."""
    return _heldout_rows(cfg.dataset, cfg.seed, cfg.model.name)


@process_cache(maxsize=2)
def _heldout_rows(dataset: DatasetConfig, seed: int, model_name: str) -> list[dict]:
    task = _load_task(dataset, seed, model_name)
    return task.encode(task.data.heldout, dataset.max_length)
