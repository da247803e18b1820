"""What server and clients share for one run: the task data, the tokenizer, the adapted model.

Everything here is cached per process, so a ClientApp process that handles many rounds
(simulation) loads the base model and the dataset once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import datasets
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.adapters.lora import cached_lora_model
from fedlora.config import LoraConfig, RunConfig
from fedlora.data.partition import load_partition
from fedlora.data.sources import TaskData, load_site_data, load_task_data
from fedlora.data.tokenize import encode_classification, encode_instruction
from fedlora.models.loading import load_tokenizer
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


@lru_cache(maxsize=2)
def load_task(cfg: RunConfig) -> Task:
    """Dataset (split under the run seed) and tokenizer for this run."""
    data = load_task_data(cfg.dataset, cfg.seed)
    check_model_task(cfg.model.name, data.task)
    return Task(data=data, tokenizer=load_tokenizer(cfg.model.name))


def adapted_model(cfg: RunConfig, device: str, lora: LoraConfig | None = None, variant: str = "shared") -> PeftModel:
    """The base model with LoRA injected, once per process; A drawn from the run seed.

    ``lora`` overrides the run's LoRA shape (a client's own rank); ``variant`` separates
    models whose base weights get changed (FLoRA merges) from the shared one.
    """
    task = load_task(cfg)
    return cached_lora_model(cfg.model.name, task.kind, task.num_labels, lora or cfg.lora, cfg.seed, device, variant)


@lru_cache(maxsize=8)
def partition_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> list[dict]:
    """One client's encoded training rows."""
    task = load_task(cfg)
    part = load_partition(task.data.train, cfg.partition, partition_id, num_partitions, cfg.seed)
    return task.encode(part, cfg.dataset.max_length)


@lru_cache(maxsize=4)
def site_rows(cfg: RunConfig, data_path: str) -> list[dict]:
    """A deployed site's own training rows from a local file (JSONL/CSV/parquet with the task's columns).

    The file is read with the run's column settings (``dataset.text-column`` …) and, for
    classification, mapped onto the run's label set; labels outside it are an error.
    """
    task = load_task(cfg)
    site = load_site_data(cfg.dataset, data_path, task.kind, task.data.labels)
    return task.encode(site, cfg.dataset.max_length)


def client_rows(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[list[dict], int]:
    """This node's training rows and its partition id (−1 for a site with its own data file).

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


@lru_cache(maxsize=2)
def heldout_rows(cfg: RunConfig) -> list[dict]:
    """The encoded held-out split (server evaluation only)."""
    task = load_task(cfg)
    return task.encode(task.data.heldout, cfg.dataset.max_length)
