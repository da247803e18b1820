"""End to end through Flower: `flwr run` on an isolated local SuperLink, judged by the run's status."""

import json

import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file

from fedlora.config import DatasetConfig
from fedlora.data.sources import load_task_data
from fedlora.runtime.launch import run_simulation
from fedlora.models.loading import load_base_model

CONTRACT = {"round", "strategy", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = run_simulation(
        {"model.name": "tiny-bert", "num-server-rounds": 2, "local-steps": 3, "batch-size": 8,
         "dataset.max-length": 32, "output-dir": str(out)},
        num_supernodes=2, echo=False, timeout=600,
    )
    assert result.ok, result.output[-3000:]
    return result


def test_run_completes_and_writes_the_contract(tiny_run):
    run_dir = tiny_run.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        assert CONTRACT <= set(r)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["num_clients"] == 2 for r in records[1:])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model.name"] == "tiny-bert" and config["num-server-rounds"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "eval_accuracy" and summary["rounds"] == 2


def test_global_adapter_changed_and_loads_with_peft(tiny_run):
    path = tiny_run.run_dir / "final_adapter"
    final = load_file(str(path / "adapter_model.safetensors"))
    b_norm = sum(float(np.abs(v).sum()) for k, v in final.items() if "lora_B" in k)
    assert b_norm > 0, "B starts at zero: a trained global adapter has non-zero B"
    labels = load_task_data(DatasetConfig(), 42).labels
    base = load_base_model("tiny-bert", "classification", len(labels))
    model = PeftModel.from_pretrained(base, path)
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_failed_run_is_reported_as_failed(tmp_path):
    result = run_simulation({"model.name": "tiny-bert", "lora.rank": 0, "output-dir": str(tmp_path / "bad")},
                            num_supernodes=2, echo=False, timeout=300)
    assert not result.ok and result.status.startswith("finished:failed")
    assert "lora.rank" in result.output
