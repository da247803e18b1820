"""The user's own data: every column of the file is kept (natural partitions on any of them), the label set is
declared once in config, and each simulated client can train on its own file, as a deployed site does."""

from __future__ import annotations

import json
import re

import pytest

from fedlora.config import DatasetConfig, PartitionConfig
from fedlora.data.partition import partition_indices
from fedlora.data.sources import load_task_data
from fedlora.run_config import load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.runtime.preflight import PreflightError, preflight
from fedlora.task import client_rows, site_rows

LABELS = ["sports", "politics", "tech"]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def classified(n: int, prefix: str = "text", **extra) -> list[dict]:
    return [{"text": f"{prefix} {i}", "label": LABELS[i % 3], **{k: v(i) for k, v in extra.items()}} for i in range(n)]


def test_every_column_of_the_file_is_kept_and_natural_partitions_use_any_of_them(tmp_path):
    path = write_rows(tmp_path / "mine.jsonl", classified(60, site=lambda i: f"site-{i % 4}", year=lambda i: 2000 + i % 2))
    data = load_task_data(DatasetConfig(name=path, task="classification"), 0)
    assert {"text", "label", "topic", "site", "year"} <= set(data.train.column_names)
    parts = partition_indices(data.train, PartitionConfig(kind="natural", column="site"), 4, 0)
    assert sorted(len({data.train[i]["site"] for i in part}) for part in parts) == [1, 1, 1, 1]
    assert preflight([f"dataset.name={path}", "dataset.task=classification", "model.name=tiny-bert",
                      "partition.kind=natural", "partition.column=site"], 4, 2).cfg.partition.column == "site"
    with pytest.raises(PreflightError, match=r"needs at most 2 clients \(one per distinct value of partition\.column\)"):
        preflight([f"dataset.name={path}", "dataset.task=classification", "partition.kind=natural",
                   "partition.column=year"], 4, 2)


def test_an_instruction_file_keeps_its_topic_and_other_columns(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "topic": f"t{i % 3}", "user": f"u{i % 5}"} for i in range(30)]
    data = load_task_data(DatasetConfig(name=write_rows(tmp_path / "qa.jsonl", rows), task="instruction"), 0)
    assert set(data.train["topic"]) == {"t0", "t1", "t2"} and set(data.train["user"]) == {f"u{i}" for i in range(5)}


def test_declared_labels_set_the_ids_and_refuse_others(tmp_path):
    declared = "tech,sports,politics"
    data = load_task_data(DatasetConfig(name=write_rows(tmp_path / "a.jsonl", classified(30)), task="classification",
                                        labels=declared), 0)
    assert data.labels == ("tech", "sports", "politics")
    assert all(data.labels[label] == topic for label, topic in zip(data.train["label"], data.train["topic"]))
    bad = write_rows(tmp_path / "b.jsonl", classified(4) + [{"text": "x", "label": "weather"}])
    with pytest.raises(ValueError, match=re.escape(f"{bad}: row 5, column 'label': label 'weather' is outside the "
                                                   "run's label set ['tech', 'sports', 'politics']")):
        load_task_data(DatasetConfig(name=bad, task="classification", labels=declared), 0).train


def test_with_declared_labels_a_site_never_reads_the_central_file(tmp_path):
    cfg = load_config({"model.name": "tiny-bert", "dataset.name": str(tmp_path / "only-on-the-server.jsonl"),
                       "dataset.task": "classification", "dataset.labels": ",".join(LABELS)})
    rows = site_rows(cfg, write_rows(tmp_path / "site.jsonl", classified(7)))
    assert [r["label"] for r in rows] == [0, 1, 2, 0, 1, 2, 0]


def test_each_simulated_client_trains_on_its_own_file(tmp_path, capsys):
    clients = tmp_path / "clients"
    clients.mkdir()
    for name, size in (("a.jsonl", 12), ("b.jsonl", 20)):
        write_rows(clients / name, classified(size, prefix=name))
    overrides = {"model.name": "tiny-bert", "num-server-rounds": 1, "local-steps": 1, "batch-size": 4,
                 "dataset.max-length": 16, "dataset.name": write_rows(tmp_path / "eval.jsonl", classified(30, "eval")),
                 "dataset.task": "classification", "dataset.labels": ",".join(LABELS),
                 "dataset.client-files": str(clients), "output-dir": str(tmp_path / "run")}
    cfg = load_config(overrides)
    assert [len(client_rows(cfg, {"partition-id": p, "num-partitions": 2})[0]) for p in (0, 1)] == [12, 20]
    with pytest.raises(ValueError, match=r"matches 2 .* file\(s\); the run has 3 clients, one file each"):
        client_rows(cfg, {"partition-id": 0, "num-partitions": 3})
    run_inprocess(overrides, num_nodes=2)
    replies = re.findall(r"\(partition (\d)\) replied after .* (\d+) rows", capsys.readouterr().out)
    assert sorted(replies) == [("0", "12"), ("1", "20")]
