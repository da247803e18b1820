"""User-supplied data files fail with an error naming the file, the row and the column."""

from __future__ import annotations

import json
import re

import pytest

from fedlora.config import DatasetConfig
from fedlora.data.sources import load_site_data, load_task_data
from fedlora.data.tokenize import encode_classification
from fedlora.models.loading import load_tokenizer

LABELS = ("greetings", "food")
SITE = DatasetConfig(name="chatterbot-topics")


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def site_error(path: str) -> str:
    with pytest.raises(ValueError) as err:
        load_site_data(SITE, path, "classification", LABELS)
    return str(err.value)


def test_a_valid_site_file_maps_onto_the_run_labels(tmp_path):
    data = load_site_data(SITE, jsonl(tmp_path / "ok.jsonl", [{"text": "hi", "label": "food"}]), "classification", LABELS)
    assert data["label"] == [1]


def test_missing_column_names_file_and_column(tmp_path):
    path = jsonl(tmp_path / "site.jsonl", [{"txt": "hello", "label": "food"}])
    assert re.search(re.escape(path) + r": missing column\(s\) \['text'\]", site_error(path))


def test_empty_and_header_only_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert site_error(str(tmp_path / "empty.jsonl")) == f"{tmp_path / 'empty.jsonl'}: the file is empty"
    (tmp_path / "header.csv").write_text("text,label\n")
    assert f"{tmp_path / 'header.csv'}: cannot be read as csv" in site_error(str(tmp_path / "header.csv"))


def test_missing_value_names_row_and_column(tmp_path):
    path = jsonl(tmp_path / "site.jsonl", [{"text": "a", "label": "food"}, {"text": None, "label": "food"}])
    assert site_error(path) == f"{path}: row 2, column 'text': missing value"


def test_label_outside_the_label_set_names_row_and_column(tmp_path):
    rows = [{"text": "a", "label": "food"}, {"text": "b", "label": "food"}, {"text": "c", "label": "weather"}]
    path = jsonl(tmp_path / "site.jsonl", rows)
    assert site_error(path).startswith(f"{path}: row 3, column 'label': label 'weather' is outside the run's label set")


def test_local_dataset_file_reports_missing_values(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q2"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 2, column 'response': missing value")):
        load_task_data(DatasetConfig(name=path, task="instruction"), 0).train


def test_over_long_texts_are_truncated_to_max_length(tmp_path):
    data = load_site_data(SITE, jsonl(tmp_path / "long.jsonl", [{"text": "word " * 5000, "label": "food"}]),
                          "classification", LABELS)
    assert len(encode_classification(load_tokenizer("tiny-bert"), data, 16)[0]["input_ids"]) == 16
