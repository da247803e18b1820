"""What server and clients share for one run: the task data, the tokenizer, the adapted model.

Everything here is cached per process, so a ClientApp process that handles many rounds
(simulation) loads the base model and the dataset once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Mapping

import datasets
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.process_cache import process_cache
from fedlora.adapters.lora import adapter_state, cached_lora_model, inject_lora
from fedlora.config import DatasetConfig, LoraConfig, PartitionConfig, RunConfig
from fedlora.data.partition import check_partition_id, partition_indices
from fedlora.data.sources import TaskData, load_site_data, load_task_data
from fedlora.data.tokenize import encode_classification, encode_instruction
from fedlora.models.loading import load_base_model, load_tokenizer
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
    """The base model with LoRA injected, once per process; A drawn from the run seed.

    ``lora`` overrides the run's LoRA shape (a client's own rank); ``variant`` separates
    models whose base weights get changed (FLoRA merges) from the shared one.
    """
    task = load_task(cfg)
    return cached_lora_model(cfg.model.name, task.kind, task.num_labels, lora or cfg.lora, cfg.seed, device, variant)


def server_model(cfg: RunConfig, device: str) -> PeftModel:
    """The server's own adapted model for one run (not shared: strategies may merge into its base)."""
    task = load_task(cfg)
    model = inject_lora(load_base_model(cfg.model.name, task.kind, task.num_labels), cfg.lora, task.kind, cfg.seed)
    model.initial_state = adapter_state(model)
    return model.to(device)


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
    """A deployed site's own training rows from a local file (JSONL/CSV/parquet with the task's columns).

    The file is read with the run's column settings (``dataset.text-column`` …) and, for
    classification, mapped onto the run's label set; labels outside it are an error.
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
    ``num-partitions`` of the run's dataset (simulation sets these two itself).
    """
    if "data-path" in node_config:
        return site_rows(cfg, str(node_config["data-path"])), int(node_config.get("partition-id", -1))
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            f"node config needs 'partition-id' and 'num-partitions', or 'data-path'; got {dict(node_config)}"
        )
    partition_id = int(node_config["partition-id"])
    return partition_rows(cfg, partition_id, int(node_config["num-partitions"])), partition_id


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
