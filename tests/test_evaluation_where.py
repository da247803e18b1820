"""``evaluation.where``: the server, the clients or nobody evaluates; the run directory is complete in every mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from peft import PeftModel

from fedlora.adapters.lora import DEFAULT_ADAPTER
from fedlora.config import ConfigError
from fedlora.models.loading import LOADS, load_base_model
from fedlora.process_cache import clear_process_caches
from fedlora.run_config import full_defaults, load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.task import adapted_model, server_model, skeleton_model

TINY = {"model.name": "tiny-bert", "num-server-rounds": 2, "local-steps": 2, "batch-size": 4, "dataset.max-length": 16,
        "dataset.eval-max-examples": 16, "dataset.local-eval-fraction": 0.05}
MODES = {"server": {}, "clients": {"fraction-evaluate": 1.0}, "none": {}}


@pytest.mark.parametrize("where", sorted(MODES))
def test_every_mode_writes_a_complete_run_directory(tmp_path, where):
    clear_process_caches()  # the clients' resident base of an earlier run would be reused
    before = LOADS["base_models"]
    run_inprocess({**TINY, **MODES[where], "evaluation.where": where, "output-dir": str(tmp_path)}, num_nodes=2)
    assert LOADS["base_models"] - before == (2 if where == "server" else 1), "the server loads a base only to evaluate"
    assert json.loads((tmp_path / "config.json").read_text())["evaluation.where"] == where
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2] and all(r["num_clients"] == 2 for r in records[1:])
    summary = json.loads((tmp_path / "summary.json").read_text())
    evaluated = {"server": "eval_accuracy", "clients": "client_eval_accuracy", "none": None}[where]
    if evaluated is None:
        assert not any(k.startswith(("eval_", "client_eval_")) for r in records for k in r)
        assert summary["final"] is None
    else:
        assert summary["metric"] == evaluated and summary["final"] == records[-1][evaluated]
        assert all(evaluated in r for r in records[1:])
    assert ("eval_accuracy" in records[0]) == (where == "server"), "round 0 is evaluated by the server only"
    model = PeftModel.from_pretrained(load_base_model("tiny-bert", "classification", 12), tmp_path / "final_adapter")
    assert any("lora_B" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("overrides", [
    {"model.name": "tiny-bert"},
    {"model.name": "tiny-llama", "dataset.name": "chatterbot-qa"},
    {"model.name": "tiny-llama", "dataset.name": "chatterbot-qa", "model.quantization": "nf4", "model.dtype": "bf16"},
])
def test_the_skeleton_starts_from_the_adapter_every_client_builds(overrides):
    """The server without a base holds exactly the initial adapter (A from the seed, B = 0, the head) that clients
    build on their real, possibly half-precision or quantized, base — and not a byte of base weights."""
    cfg = load_config({**full_defaults(), **overrides})
    skeleton = skeleton_model(cfg)
    client = adapted_model(cfg, "cpu")
    assert set(skeleton.initial_state) == set(client.initial_state)
    assert all(np.array_equal(skeleton.initial_state[k], v) for k, v in client.initial_state.items())
    assert all(p.is_meta for n, p in skeleton.named_parameters() if f".{DEFAULT_ADAPTER}." not in n)
    assert all(not p.is_meta for n, p in skeleton.named_parameters() if f".{DEFAULT_ADAPTER}." in n)


def test_the_server_model_holds_the_real_base_and_starts_where_the_skeleton_does():
    cfg = load_config({**full_defaults(), "model.name": "tiny-bert"})
    real = server_model(cfg, "cpu")
    assert not any(p.is_meta for p in real.parameters())
    assert all(np.array_equal(real.initial_state[k], v) for k, v in skeleton_model(cfg).initial_state.items())


@pytest.mark.parametrize("overrides, fragment", [
    ({"evaluation.where": "clients"}, "set fraction-evaluate > 0"),
    ({"evaluation.where": "none", "fraction-evaluate": 0.5}, "nobody evaluates with 'none'"),
    ({"evaluation.where": "everywhere"}, "'evaluation.where' = 'everywhere' is invalid"),
])
def test_inconsistent_evaluation_settings_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides)
