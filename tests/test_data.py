import numpy as np
import pytest

from fedlora.config import DatasetConfig, PartitionConfig
from fedlora.data.partition import natural_groups, partition_indices
from fedlora.data.sources import load_task_data
from fedlora.data.tokenize import IGNORE, encode_instruction
from fedlora.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def topics():
    return load_task_data(DatasetConfig(), 42)


def test_embedded_classification_default(topics):
    assert topics.task == "classification" and len(topics.labels) >= 10
    assert len(topics.train) > 500 and len(topics.heldout) > 100
    assert set(topics.train["label"]) == set(range(len(topics.labels)))
    train_texts = list(zip(topics.train["text"], topics.train["label"]))
    heldout_texts = list(zip(topics.heldout["text"], topics.heldout["label"]))
    assert not set(train_texts) & set(heldout_texts), "held-out rows leak into training"


def test_split_is_deterministic_under_seed(topics):
    again = load_task_data.__wrapped__(DatasetConfig(), 42)
    other = load_task_data.__wrapped__(DatasetConfig(), 7)
    assert again.heldout["text"] == topics.heldout["text"]
    assert other.heldout["text"] != topics.heldout["text"]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural"])
def test_partitions_cover_train_disjointly_and_deterministically(topics, kind):
    cfg = PartitionConfig(kind=kind, alpha=0.5, column="topic")
    parts = partition_indices(topics.train, cfg, 4, seed=1)
    assert len(parts) == 4 and all(len(p) > 0 for p in parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(topics.train)))
    assert partition_indices(topics.train, cfg, 4, seed=1) == parts


def test_iid_sizes_are_balanced(topics):
    parts = partition_indices(topics.train, PartitionConfig(kind="iid"), 5, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _label_skew(train, parts, num_labels):
    """Mean total-variation distance between each client's label histogram and the global one."""
    labels = np.asarray(train["label"])
    glob = np.bincount(labels, minlength=num_labels) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=num_labels) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))


def test_dirichlet_is_skewed_and_alpha_controls_it(topics):
    n = len(topics.labels)
    iid = _label_skew(topics.train, partition_indices(topics.train, PartitionConfig(kind="iid"), 4, 0), n)
    mild = _label_skew(topics.train, partition_indices(topics.train, PartitionConfig(kind="dirichlet", alpha=10.0), 4, 0), n)
    strong = _label_skew(topics.train, partition_indices(topics.train, PartitionConfig(kind="dirichlet", alpha=0.1), 4, 0), n)
    assert strong > 0.4 > iid
    assert strong > mild


def test_natural_gives_whole_groups():
    parts = natural_groups(["b", "a", "c", "a", "b", "d"], 2)
    assert parts == [[1, 2, 3], [0, 4, 5]]  # a,c -> 0 ; b,d -> 1
    with pytest.raises(ValueError, match="at most 4 clients"):
        natural_groups(["a", "b", "c", "d"], 5)


def test_instruction_labels_cover_response_only():
    data = load_task_data(DatasetConfig(name="chatterbot-qa"), 0)
    tok = load_tokenizer("tiny-llama")
    rows = encode_instruction(tok, data.train.select(range(8)), 48)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) <= 48
        first = next(i for i, y in enumerate(row["labels"]) if y != IGNORE)
        assert all(y == IGNORE for y in row["labels"][:first])
        assert row["labels"][first:] == row["input_ids"][first:]


def test_clients_share_one_partition_table_per_process():
    """Many virtual clients in one process partition the train set once, not once each."""
    import fedlora.task as task
    from fedlora.run_config import load_config

    cfg = load_config({"model.name": "tiny-bert", "partition.kind": "iid", "seed": 5})
    task._partition_table.cache_clear()
    rows = [task.partition_rows(cfg, i, 7) for i in range(7)]
    assert task._partition_table.cache_info().misses == 1
    assert sum(len(r) for r in rows) == len(task.load_task(cfg).data.train)
    with pytest.raises(ValueError, match=r"partition-id must be in \[0, 7\), got 7"):
        task.partition_rows(cfg, 7, 7)


def test_local_split_holds_out_a_seeded_share_of_each_clients_rows():
    from fedlora.task import local_split

    rows = [{"input_ids": [i], "label": i % 3} for i in range(20)]
    train, held = local_split(rows, 0.25, seed=7, partition_id=2)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["input_ids"][0] for r in train + held) == list(range(20))
    assert local_split(rows, 0.25, seed=7, partition_id=2) == (train, held)
    assert local_split(rows, 0.25, seed=7, partition_id=3)[1] != held
    assert local_split(rows, 0.0, seed=7, partition_id=2) == (rows, rows)
    assert len(local_split(rows[:1], 0.5, seed=7, partition_id=2)[0]) == 1, "one row always stays for training"


def test_clients_evaluate_on_their_held_out_share(tmp_path):
    import json

    from fedlora.runtime.inprocess import run_inprocess

    out = tmp_path / "run"
    run_inprocess({"model.name": "tiny-bert", "num-server-rounds": 1, "local-steps": 1, "batch-size": 4,
                   "dataset.max-length": 16, "fraction-evaluate": 1.0, "dataset.local-eval-fraction": 0.25,
                   "output-dir": str(out)}, num_nodes=2)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= last["client_eval_accuracy"] <= 1 and last["client_eval_loss"] > 0
