"""The portable final adapter: a copy of ``final_adapter/`` loads elsewhere, from every strategy's save path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel

from fedlora.adapters.export import LABELS_FILE
from fedlora.models.loading import load_base_model
from fedlora.models.portable import PORTABLE_IDS, install_into_hub_cache
from fedlora.process_cache import clear_process_caches
from fedlora.runtime.inprocess import run_inprocess
from fedlora.strategies.registry import strategies

#: the smallest job that trains: one round, where nobody evaluates
JOB = {"num-server-rounds": 1, "local-steps": 1, "batch-size": 2, "dataset.max-length": 8, "evaluation.where": "none"}
IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])


def adapter_config(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def test_a_copy_loads_with_automodel_after_the_machines_model_cache_is_gone(tmp_path, monkeypatch):
    """tiny-llama's base lives in fedlora's cache (``$FEDLORA_CACHE``); the copy names ``fedlora/tiny-llama``, which
    the documented hub-cache install serves offline once that cache is deleted."""
    cache, hub = tmp_path / "fedlora-cache", tmp_path / "hub"
    monkeypatch.setenv("FEDLORA_CACHE", str(cache))
    run_inprocess({**JOB, "model.name": "tiny-llama", "dataset.name": "chatterbot-qa",
                   "output-dir": str(tmp_path / "run")})
    assert adapter_config(tmp_path / "run" / "final_adapter")["base_model_name_or_path"] == "fedlora/tiny-llama"
    assert not (tmp_path / "run" / "final_adapter" / LABELS_FILE).exists(), "a causal LM has no labels"
    install_into_hub_cache("tiny-llama", hub)
    copy = shutil.copytree(tmp_path / "run" / "final_adapter", tmp_path / "elsewhere" / "adapter")
    reference = PeftModel.from_pretrained(load_base_model("tiny-llama", "instruction", 0), copy).eval()
    with torch.no_grad():
        want = reference(input_ids=IDS).logits
    shutil.rmtree(cache)
    clear_process_caches()
    loaded = AutoPeftModelForCausalLM.from_pretrained(copy, cache_dir=hub).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, want, atol=1e-5)


def test_the_embedded_minilm_adapter_names_its_hub_id_and_its_labels(tmp_path):
    run_inprocess({**JOB, "model.name": "minilm", "output-dir": str(tmp_path / "run")})
    final = tmp_path / "run" / "final_adapter"
    assert adapter_config(final)["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in (final / "README.md").read_text()
    labels = json.loads((final / LABELS_FILE).read_text())
    assert labels["num_labels"] == 12 and labels["label2id"][labels["id2label"]["3"]] == 3
    copy = shutil.copytree(final, tmp_path / "elsewhere" / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(
        copy, cache_dir=install_into_hub_cache("minilm", tmp_path / "hub").parents[2], **labels).eval()
    assert {int(i): name for i, name in loaded.config.id2label.items()}[3] == labels["id2label"]["3"]
    reference = PeftModel.from_pretrained(load_base_model("minilm", "classification", 12), copy).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bert_hub(tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    install_into_hub_cache("tiny-bert", hub)
    return hub


@pytest.mark.parametrize("strategy", sorted(strategies()))
def test_every_strategy_trains_with_checkpointing_and_saves_the_portable_format(tmp_path, strategy, tiny_bert_hub):
    """Every client role trains with gradient checkpointing on (Fed-SB's client builds its own LoRA-SB model and
    does not read ``model.*`` yet), and every server part's save path (FLoRA's and FedEx-LoRA's merged adapters
    included) writes the same portable adapter."""
    run_inprocess({**JOB, "model.name": "tiny-bert", "strategy": strategy, "model.gradient-checkpointing": True,
                   "output-dir": str(tmp_path)}, num_nodes=2)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["num_clients"] == 2, record.get("rejected")
    final = tmp_path / "final_adapter"
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      LABELS_FILE]
    assert adapter_config(final)["base_model_name_or_path"] == PORTABLE_IDS["tiny-bert"]
    labels = json.loads((final / LABELS_FILE).read_text())
    model = AutoPeftModelForSequenceClassification.from_pretrained(final, cache_dir=tiny_bert_hub, **labels)
    assert model(input_ids=IDS).logits.shape == (1, 12)
