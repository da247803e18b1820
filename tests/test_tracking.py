"""report-to: every round's metrics reach TensorBoard event files and an offline W&B run, read back here."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedlora.config import ConfigError
from fedlora.runtime.inprocess import run_inprocess
from fedlora.server import tracking
from fedlora.server.tracking import check_report_to, numeric, report_targets


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"WANDB_MODE": "offline", "WANDB_PROJECT": "fedlora-tests",
                            "WANDB_CONFIG_DIR": str(out.parent / "wandb-config"),
                            "WANDB_CACHE_DIR": str(out.parent / "wandb-cache")}.items():
            env.setenv(name, value)
        run_inprocess({"model.name": "tiny-bert", "num-server-rounds": 2, "local-steps": 2, "batch-size": 8,
                       "dataset.max-length": 16, "report-to": "tensorboard,wandb", "output-dir": str(out)}, num_nodes=2)
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_every_round(tracked_run):
    out, records = tracked_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("eval_accuracy", "eval_loss", "bytes_up"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["round"] for r in records]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert [s.step for s in events.Scalars("train_loss")] == [1, 2]  # round 0 trains nothing
    assert "config/text_summary" in events.Tags()["tensors"]


def test_an_offline_wandb_run_holds_every_round(tracked_run):
    out, records = tracked_run
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].name == f"run-{(out / tracking.WANDB_ID_FILE).read_text().strip()}.wandb"
    logged = runs[0].read_bytes()
    for record in records:
        for key in ("eval_accuracy", "eval_loss"):
            assert json.dumps(record[key]).encode() in logged, (record["round"], key)


def test_report_to_names_its_missing_package(monkeypatch):
    monkeypatch.setitem(tracking.PACKAGES, "wandb", "fedlora_no_such_package")
    with pytest.raises(ConfigError, match=r"'report-to' = 'tensorboard,wandb' needs the 'fedlora_no_such_package' "
                                          r"package: pip install 'fedlora\[tracking\]'"):
        check_report_to("tensorboard,wandb")
    check_report_to("none")


def test_only_numbers_are_tracked():
    record = {"round": 3, "strategy": "fedavg", "train_loss": None, "eval_accuracy": 0.5, "num_clients": 2,
              "rejected": ["node 1: late"], "dp": True}
    assert numeric(record) == {"eval_accuracy": 0.5, "num_clients": 2.0}
    assert report_targets("none") == [] and report_targets("tensorboard, wandb") == ["tensorboard", "wandb"]
