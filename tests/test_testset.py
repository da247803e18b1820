"""The test split: scored once after the last round, per example, the same for every seed and strategy."""

import json

import numpy as np
import pytest
import torch

from fedlora.config import ConfigError
from fedlora.evaluation import evaluate_rows
from fedlora.run_config import full_defaults, load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.server.rundir import RUNNING_CODE_VERSION, code_version
from fedlora.server.rundir import TEST_FILE
from fedlora.server.testset import per_example_outputs, split_metrics
from fedlora.task import heldout_rows, load_task, server_model

TINY = {"model.name": "tiny-bert", "num-server-rounds": 1, "local-steps": 2, "batch-size": 4,
        "dataset.max-length": 16, "dataset.eval-max-examples": 16, "dataset.test-fraction": 0.2}


def run(tmp_path, name, **overrides):
    out = tmp_path / name
    run_inprocess({**TINY, "output-dir": str(out), **overrides}, num_nodes=2)
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("testset")
    return {key: run(root, f"{key[0]}-{key[1]}", strategy=key[0], seed=key[1])
            for key in [("fedavg", 1), ("fedavg", 2), ("flora", 1)]}


def test_every_run_scores_the_same_test_split_once(runs):
    fingerprints = set()
    for out, summary in runs.values():
        with np.load(out / TEST_FILE, allow_pickle=False) as data:
            n = summary["test_examples"]
            assert all(data[k].shape == (n,) for k in ("correct", "loss", "tokens", "label", "prediction"))
            assert summary["test_accuracy"] == pytest.approx(float(data["correct"].mean()))
            assert summary["test_loss"] == pytest.approx(float(data["loss"].sum() / data["tokens"].sum()))
            assert (data["correct"] == (data["prediction"] == data["label"])).all()
            fingerprints.add(str(data["fingerprint"]))
            assert 0 <= int(data["majority_label"]) < 12
        assert summary["test_fingerprint"] in fingerprints and summary["code_version"] == RUNNING_CODE_VERSION
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert not any(k.startswith("test_") for r in records for k in r)  # rounds see only the validation split
    assert len(fingerprints) == 1  # seeds 1 and 2, fedavg and flora: one test split


def test_no_test_split_no_test_results(tmp_path):
    out, summary = run(tmp_path, "none", **{"dataset.test-fraction": 0.0})
    assert not (out / TEST_FILE).exists() and not any(k.startswith("test_") for k in summary)


def test_per_example_outputs_agree_with_the_split_evaluation():
    """The per-example scores sum to what the rounds' evaluation reports, for both task kinds, in row order."""
    for model_name, dataset in (("tiny-bert", "chatterbot-topics"), ("tiny-llama", "chatterbot-qa")):
        cfg = load_config({**full_defaults(), **TINY, "model.name": model_name, "dataset.name": dataset})
        task, rows = load_task(cfg), heldout_rows(cfg)
        model = server_model(cfg, "cpu")
        device = torch.device("cpu")
        outputs = per_example_outputs(model, rows, task.kind, task.pad_id, device, batch_size=5)
        reported = evaluate_rows(model, rows, task.kind, task.pad_id, 64, device)
        metrics = split_metrics(outputs, task.kind)
        assert metrics["test_loss"] == pytest.approx(reported["eval_loss"], rel=1e-5)
        if task.kind == "classification":
            assert metrics["test_accuracy"] == pytest.approx(reported["eval_accuracy"])
            assert outputs.label.tolist() == [r["label"] for r in rows]
        else:
            assert outputs.tokens.sum() > len(rows) and (outputs.prediction == -1).all()


def test_a_test_split_needs_the_server_to_evaluate():
    with pytest.raises(ConfigError, match="'dataset.test-fraction'.*'evaluation.where'"):
        load_config({**full_defaults(), **TINY, "evaluation.where": "none"})


def test_code_version_covers_the_sources_but_not_the_analysis(tmp_path):
    (tmp_path / "experiments" / "report").mkdir(parents=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "experiments" / "report" / "tables.py").write_text("y = 1\n")
    first = code_version(tmp_path)
    (tmp_path / "experiments" / "report" / "tables.py").write_text("y = 2\n")
    assert code_version(tmp_path) == first
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) != first and len(first) == 16
