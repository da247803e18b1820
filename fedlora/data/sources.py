"""Task datasets by name: the embedded offline defaults, local files and the Hugging Face hub.

Every source is normalised to one of two schemas:

* classification: ``text`` (str), ``label`` (int in ``[0, len(labels))``), ``topic`` (str)
* instruction:    ``prompt`` (str), ``response`` (str), ``topic`` (str)

and split once, deterministically under the run seed, into a train split (partitioned
among clients) and a held-out split that only the server evaluates on.

User-supplied files (``dataset.name`` as a local file, a site's ``data-path``) are checked
on load: an unreadable or empty file, a missing column, a missing (null) value or a label
outside the run's label set is a ``ValueError`` naming the file, the row (data rows count
from 1; the CSV header is not a row) and the column. Texts of any length are accepted:
tokenization truncates every example to ``dataset.max-length`` tokens.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

datasets.disable_progress_bars()

from fedlora.config import ConfigError, DatasetConfig
from fedlora.process_cache import process_cache
from fedlora.data import chatterbot

CLASSIFICATION = "classification"
INSTRUCTION = "instruction"

#: built-in dataset name -> task kind
BUILTIN_DATASETS = {"chatterbot-topics": CLASSIFICATION, "chatterbot-qa": INSTRUCTION}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: topics of the classification default: those with enough examples, each capped so
#: that no topic dominates (tech_support alone would otherwise be half the corpus).
TOPIC_MIN_EXAMPLES = 15
TOPIC_MAX_EXAMPLES = 150
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class TaskData:
    """A task's train and held-out splits in the normalised schema."""

    task: str
    train: datasets.Dataset
    heldout: datasets.Dataset
    labels: tuple[str, ...] = ()


def resolve_task(cfg: DatasetConfig) -> str:
    """The task kind of the configured dataset (built-ins know their own)."""
    if cfg.name in BUILTIN_DATASETS:
        builtin = BUILTIN_DATASETS[cfg.name]
        if cfg.task not in ("auto", builtin):
            raise ConfigError(
                f"config key 'dataset.task' = {cfg.task!r} is invalid for dataset.name={cfg.name!r}: "
                f"expected 'auto' or {builtin!r}"
            )
        return builtin
    if cfg.task == "auto":
        raise ConfigError(
            f"config key 'dataset.task' = 'auto' is invalid for dataset.name={cfg.name!r}: "
            f"expected {CLASSIFICATION!r} or {INSTRUCTION!r} for datasets other than the built-ins"
        )
    return cfg.task


def check_dataset_name(name: str, task: str) -> None:
    """Reject names that are neither built-in, an existing local file, nor an ``org/name`` hub id."""
    if name in BUILTIN_DATASETS:
        resolve_task(DatasetConfig(name=name, task=task))
        return
    path = Path(name)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"config key 'dataset.name' = {name!r} is invalid: no such file")
    elif not _HUB_ID.match(name):
        raise ConfigError(
            f"config key 'dataset.name' = {name!r} is invalid: expected one of "
            f"{', '.join(map(repr, BUILTIN_DATASETS))}, a local .jsonl/.json/.csv/.parquet file, "
            "or a Hugging Face hub id 'org/name'"
        )
    resolve_task(DatasetConfig(name=name, task=task))


def _topics_dataset() -> tuple[datasets.Dataset, tuple[str, ...]]:
    by_topic: dict[str, list[str]] = {}
    for row in chatterbot.load_pairs():
        texts = by_topic.setdefault(row["topic"], [])
        if row["prompt"] not in texts:
            texts.append(row["prompt"])
    kept = sorted(t for t, texts in by_topic.items() if len(texts) >= TOPIC_MIN_EXAMPLES)
    rng = random.Random(0)  # the dataset's own definition, independent of the run seed
    rows = {"text": [], "label": [], "topic": []}
    for label, topic in enumerate(kept):
        texts = by_topic[topic]
        chosen = sorted(rng.sample(range(len(texts)), min(len(texts), TOPIC_MAX_EXAMPLES)))
        for i in chosen:
            rows["text"].append(texts[i])
            rows["label"].append(label)
            rows["topic"].append(topic)
    return datasets.Dataset.from_dict(rows), tuple(kept)


def read_local_file(file: Path) -> datasets.Dataset:
    """A local .jsonl/.json/.csv/.parquet file as a Dataset; ``ValueError`` naming the file if it is empty or unreadable."""
    if file.stat().st_size == 0:
        raise ValueError(f"{file}: the file is empty")
    try:
        data = datasets.load_dataset(LOCAL_SUFFIXES[file.suffix], data_files=str(file), split="train")
    except Exception as err:  # noqa: BLE001 — datasets raises many types (StopIteration, DatasetGenerationError …)
        raise ValueError(f"{file}: cannot be read as {LOCAL_SUFFIXES[file.suffix]} ({type(err).__name__}: {err})") from err
    if len(data) == 0:
        raise ValueError(f"{file}: the file has no data rows")
    return data


def _load_external(cfg: DatasetConfig) -> datasets.Dataset:
    path = Path(cfg.name)
    if path.suffix in LOCAL_SUFFIXES:
        return read_local_file(path)
    return datasets.load_dataset(cfg.name, split=cfg.split)


def _check_values(raw: datasets.Dataset, columns: tuple[str, ...], name: str) -> None:
    """Every row has a value (not null) in each of ``columns``; else a ValueError naming file, row and column."""
    for column in columns:
        empty = next((i for i, v in enumerate(raw[column]) if v is None), None)
        if empty is not None:
            raise ValueError(f"{name}: row {empty + 1}, column {column!r}: missing value")


def _normalise_external(raw: datasets.Dataset, cfg: DatasetConfig, task: str) -> tuple[datasets.Dataset, tuple[str, ...]]:
    wanted = (cfg.text_column, cfg.label_column) if task == CLASSIFICATION else (cfg.prompt_column, cfg.response_column)
    missing = [c for c in wanted if c not in raw.column_names]
    if missing:
        raise ValueError(f"{cfg.name}: missing column(s) {missing}; it has {raw.column_names}")
    if len(raw) == 0:
        raise ValueError(f"{cfg.name}: the dataset has no rows")
    _check_values(raw, wanted, cfg.name)
    topic = raw[cfg.label_column] if task == CLASSIFICATION else [""] * len(raw)
    if task == INSTRUCTION:
        data = {"prompt": [str(x) for x in raw[cfg.prompt_column]], "response": [str(x) for x in raw[cfg.response_column]]}
        return datasets.Dataset.from_dict({**data, "topic": topic}), ()
    feature = raw.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel):
        labels = tuple(feature.names)
        ids = list(raw[cfg.label_column])
    else:
        labels = tuple(sorted({str(v) for v in raw[cfg.label_column]}))
        index = {name: i for i, name in enumerate(labels)}
        ids = [index[str(v)] for v in raw[cfg.label_column]]
    texts = [str(x) for x in raw[cfg.text_column]]
    return datasets.Dataset.from_dict({"text": texts, "label": ids, "topic": [labels[i] for i in ids]}), labels


def load_site_data(cfg: DatasetConfig, path: str, task: str, labels: tuple[str, ...]) -> datasets.Dataset:
    """A site's own data file in the normalised schema, labels mapped onto the run's ``labels``."""
    file = Path(path)
    if file.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"data-path {path!r}: expected a {', '.join(LOCAL_SUFFIXES)} file")
    if not file.is_file():
        raise ValueError(f"data-path {path!r}: no such file")
    raw = read_local_file(file)
    site_cfg = dataclasses.replace(cfg, name=str(file))
    if task == INSTRUCTION:
        return _normalise_external(raw, site_cfg, task)[0]
    if cfg.label_column in raw.column_names:  # site labels are names; a missing column is reported below
        raw = raw.cast_column(cfg.label_column, datasets.Value("string"))
    data, _ = _normalise_external(raw, site_cfg, task)
    index = {name: i for i, name in enumerate(labels)}
    unknown = [(i, t) for i, t in enumerate(data["topic"]) if t not in index]
    if unknown:
        row, label = unknown[0]
        raise ValueError(f"{file}: row {row + 1}, column {cfg.label_column!r}: label {label!r} is outside the run's label set "
                         f"{list(labels)} ({len(unknown)} row(s) affected)")
    return data.map(lambda row: {"label": index[row["topic"]]})


@process_cache(maxsize=4)
def load_task_data(cfg: DatasetConfig, seed: int) -> TaskData:
    """Load, normalise and split the configured dataset (cached per process).

    The held-out split is ``cfg.eval_fraction`` of the examples, stratified by label for
    classification, chosen with ``seed``; no client ever trains on it.
    """
    task = resolve_task(cfg)
    if cfg.name == "chatterbot-topics":
        full, labels = _topics_dataset()
    elif cfg.name == "chatterbot-qa":
        full, labels = datasets.Dataset.from_list(chatterbot.load_pairs()), ()
    else:
        full, labels = _normalise_external(_load_external(cfg), cfg, task)
    stratify = None
    if task == CLASSIFICATION:
        full = full.cast_column("label", datasets.ClassLabel(names=list(labels)))
        stratify = "label"
    split = full.train_test_split(test_size=cfg.eval_fraction, seed=seed, stratify_by_column=stratify)
    heldout = split["test"]
    if cfg.eval_max_examples and len(heldout) > cfg.eval_max_examples:
        heldout = heldout.select(range(cfg.eval_max_examples))
    return TaskData(task=task, train=split["train"], heldout=heldout, labels=labels)
