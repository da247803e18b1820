"""What server and clients share for one run: the task data, the tokenizer, the adapted model.

Everything here is cached per process, so a ClientApp process that handles many rounds
(simulation) loads the base model and the dataset once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import datasets
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.adapters.lora import cached_lora_model
from fedlora.config import RunConfig
from fedlora.data.partition import load_partition
from fedlora.data.sources import TaskData, load_task_data
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


def adapted_model(cfg: RunConfig, device: str) -> PeftModel:
    """The base model with LoRA injected, once per process; A drawn from the run seed."""
    task = load_task(cfg)
    return cached_lora_model(cfg.model.name, task.kind, task.num_labels, cfg.lora, cfg.seed, device)


@lru_cache(maxsize=8)
def partition_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> list[dict]:
    """One client's encoded training rows."""
    task = load_task(cfg)
    part = load_partition(task.data.train, cfg.partition, partition_id, num_partitions, cfg.seed)
    return task.encode(part, cfg.dataset.max_length)


@lru_cache(maxsize=2)
def heldout_rows(cfg: RunConfig) -> list[dict]:
    """The encoded held-out split (server evaluation only)."""
    task = load_task(cfg)
    return task.encode(task.data.heldout, cfg.dataset.max_length)
