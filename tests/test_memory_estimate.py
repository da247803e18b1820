"""The memory estimate: its terms, what each knob saves, the facts it reads off a skeleton, refusing what cannot fit."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from fedlora.adapters.lora import DEFAULT_ADAPTER, adapter_state
from fedlora.config import ConfigError
from fedlora.models.loading import LOADS
from fedlora.models.memory import GIB, QUANTIZED_BYTES, RUNTIME, ModelFacts, Workload, estimate, facts_of, knobs_that_fit
from fedlora.run_config import full_defaults, load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.task import adapted_model, server_model, skeleton_model

FACTS = ModelFacts(quantizable=1000, dense=100, trainable=10, adapter_io=20, hidden=8, intermediate=16, layers=2,
                   heads=2, outputs=50, per_token_outputs=True)
WORK = Workload(weight_bytes=4, activation_bytes=4, quantization="none", batch=2, length=3, checkpointing=False,
                optimizer="adamw", dp="none")
TINY = {"model.name": "tiny-bert", "num-server-rounds": 1, "local-steps": 1, "batch-size": 4, "dataset.max-length": 16,
        "dataset.eval-max-examples": 16}


def test_the_estimate_adds_up_the_documented_terms():
    tokens = 2 * 3
    layer = (tokens * (10 * 8 + 3 * 16) + 2 * 2 * 2 * 3**2) * 4
    logits = tokens * 50 * (4 + 8)
    est = estimate(FACTS, WORK)
    assert est.weights == 1100 * 4
    assert (est.adapters, est.gradients, est.optimizer, est.dp) == (40, 40, 80, 0)
    assert est.activations == 2 * layer + tokens * 8 * 4 + logits
    assert est.total == 4400 + 160 + est.activations + RUNTIME


def test_each_knob_saves_what_it_should():
    base = estimate(FACTS, WORK)
    assert estimate(FACTS, dataclasses.replace(WORK, weight_bytes=2)).weights == base.weights / 2
    assert estimate(FACTS, dataclasses.replace(WORK, quantization="nf4")).weights == \
        pytest.approx(1000 * QUANTIZED_BYTES["nf4"] + 100 * 4)
    assert estimate(FACTS, dataclasses.replace(WORK, checkpointing=True)).activations < base.activations
    assert estimate(FACTS, dataclasses.replace(WORK, optimizer="sgd")).optimizer == 0
    hooks = estimate(FACTS, dataclasses.replace(WORK, dp="hooks")).dp
    ghost = estimate(FACTS, dataclasses.replace(WORK, dp="ghost")).dp
    assert hooks == 4 * 6 * 20 + 4 * 2 * 10 and ghost == 4 * 6 * 20
    evaluating = estimate(FACTS, dataclasses.replace(WORK, training=False))
    assert evaluating.gradients == evaluating.optimizer == 0 and evaluating.activations < base.activations


@pytest.mark.parametrize("name, task, labels", [("tiny-bert", "classification", 12), ("tiny-llama", "instruction", 0)])
def test_the_facts_read_off_a_skeleton_count_the_real_model(name, task, labels):
    dataset = "chatterbot-topics" if task == "classification" else "chatterbot-qa"
    cfg = load_config({**full_defaults(), "model.name": name, "dataset.name": dataset, "evaluation.where": "server"})
    facts = facts_of(skeleton_model(cfg), DEFAULT_ADAPTER, causal=task == "instruction")
    real = server_model(cfg, "cpu")
    base_params = sum(p.numel() for n, p in real.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    assert facts.trainable == sum(v.size for v in adapter_state(real).values())
    assert facts.quantizable + facts.dense == base_params
    assert facts.outputs == (labels if task == "classification" else real.config.vocab_size)


def test_knobs_name_single_changes_then_a_combination_then_nothing():
    work = dataclasses.replace(WORK, batch=64, length=64)
    full = estimate(FACTS, work).total
    with_checkpointing = estimate(FACTS, dataclasses.replace(work, checkpointing=True)).total
    assert with_checkpointing < full
    knobs = knobs_that_fit(FACTS, work, capacity=with_checkpointing)
    assert "model.gradient-checkpointing=true" in knobs and "batch-size=32" in knobs
    assert knobs_that_fit(FACTS, work, capacity=RUNTIME) == []
    big = ModelFacts(quantizable=7 * 10**9, dense=10**8, trainable=10**7, adapter_io=10**5, hidden=4096,
                     intermediate=11008, layers=32, heads=32, outputs=32000, per_token_outputs=True)  # a 7B decoder
    combined = dataclasses.replace(work, checkpointing=True, quantization="nf4", weight_bytes=2, activation_bytes=2)
    tight = estimate(big, dataclasses.replace(combined, batch=8)).total
    assert knobs_that_fit(big, work, capacity=tight) == [
        "model.gradient-checkpointing=true + model.dtype='bf16' + model.quantization='nf4' + batch-size=8"]
    assert knobs_that_fit(FACTS, work, capacity=full - 1, spread_capacity=2 * full) == [
        "model.gradient-checkpointing=true", "model.dtype='bf16'", "model.quantization='nf4'",
        "model.device-map='spread'", "batch-size=32", "dataset.max-length=32"]


def test_a_client_that_cannot_fit_is_refused_before_its_base_loads(caplog):
    flat = {**full_defaults(), **TINY, "batch-size": 64, "dataset.max-length": 64}
    fitting = adapted_model(load_config(flat), "cpu")  # noqa: F841 — its estimate is logged
    assert "client memory estimate on cpu" in caplog.text
    before = LOADS["base_models"]
    with pytest.raises(ConfigError) as err:
        adapted_model(load_config({**flat, "memory.limit-gb": (RUNTIME + 5 * 2**20) / GIB}), "cpu")
    message = str(err.value)
    assert message.startswith("the client model does not fit cpu: estimated ") and "(memory.limit-gb)" in message
    assert "it would fit with" in message and "batch-size=" in message
    assert LOADS["base_models"] == before


def test_a_server_that_cannot_fit_refuses_the_run_and_clients_that_cannot_refuse_their_rounds(tmp_path):
    with pytest.raises(ConfigError, match="the server model does not fit cpu"):
        run_inprocess({**TINY, "memory.limit-gb": 0.1, "output-dir": str(tmp_path / "server")})
    run_inprocess({**TINY, "memory.limit-gb": 0.1, "evaluation.where": "none", "output-dir": str(tmp_path / "clients")})
    last = [json.loads(line) for line in (tmp_path / "clients" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "skipped" in last and all("the client model does not fit cpu" in r for r in last["rejected"])


@pytest.fixture(autouse=True)
def _info_logs(caplog, monkeypatch):
    """INFO lines of Flower's logger reach ``caplog`` whatever an earlier test in this process did to that logger's
    level or propagation."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="flwr")
    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)
