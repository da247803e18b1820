"""Virtual clients served by one process share one resident base; they differ only in their adapters."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedlora.adapters.lora import adapter_state, set_trainable
from fedlora.models.loading import LOADS
from fedlora.process_cache import clear_process_caches
from fedlora.run_config import full_defaults, load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.task import adapted_model

TINY = {"model.name": "tiny-bert", "num-server-rounds": 2, "local-steps": 1, "batch-size": 4, "dataset.max-length": 16,
        "dataset.eval-max-examples": 16}


@pytest.mark.parametrize("strategy", ["hetlora", "flora"])
def test_several_virtual_clients_of_mixed_ranks_hold_one_base(tmp_path, strategy):
    """5 virtual clients at ranks 2, 4, 8 in one process: one base is loaded for all of them (the server, which
    leaves evaluation to the clients, loads none); every round aggregates all five."""
    clear_process_caches()
    before = LOADS["base_models"]
    run_inprocess({**TINY, "strategy": strategy, "lora.client-ranks": "2,4,8", "evaluation.where": "clients",
                   "fraction-evaluate": 1.0, "dataset.local-eval-fraction": 0.05, "output-dir": str(tmp_path)},
                  num_nodes=5)
    assert LOADS["base_models"] - before == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("num_clients") for r in records[1:]] == [5.0, 5.0]
    assert all("client_eval_accuracy" in r for r in records[1:])


def test_a_client_of_another_rank_swaps_the_adapter_not_the_base():
    cfg = load_config({**full_defaults(), "model.name": "tiny-bert"})
    small = adapted_model(cfg, "cpu", dataclasses.replace(cfg.lora, rank=2))
    base = small.get_base_model()
    large = adapted_model(cfg, "cpu", dataclasses.replace(cfg.lora, rank=8))
    assert large.get_base_model() is base, "one resident base"
    assert len(large.peft_config) == 1, "the model holds the current client's adapter only"
    assert {v.shape[0] for k, v in adapter_state(large).items() if k.endswith("lora_A.weight")} == {8}
    params = set_trainable(large)
    assert {id(p) for p in params} == {id(p) for p in large.parameters() if p.requires_grad}
    assert all(f".{large.active_adapter}." in n for n, p in large.named_parameters() if p.requires_grad)
    again = adapted_model(cfg, "cpu", dataclasses.replace(cfg.lora, rank=2))
    assert again.get_base_model() is base and len(again.peft_config) == 1
    state = adapter_state(again)
    assert {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")} == {2}
    assert all(np.array_equal(v, again.initial_state[k]) for k, v in state.items()), "a fresh rank-2 adapter"
