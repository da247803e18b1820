"""Task datasets by name: the embedded offline defaults, local files and the Hugging Face hub.

Every source is normalised to one of two schemas:

* classification: ``text`` (str), ``label`` (int in ``[0, len(labels))``), ``topic`` (str: the label's name)
* instruction:    ``prompt`` (str), ``response`` (str), ``topic`` (str: the file's ``topic`` column, else empty)

plus every other column of the user's file under its own name (so ``partition.kind=natural``
can group by any of them), and split once, deterministically under the run seed, into a
train split (partitioned among clients) and a held-out split that only the server evaluates on.

The label set is ``dataset.labels`` when declared (in that order), else the sorted values of
the label column of ``dataset.name``. With declared labels (and for instruction tasks) the
splits of ``dataset.name`` are read on first use only, so a site or simulated client that
trains on its own file never needs the central one.

User-supplied files (``dataset.name`` as a local file, ``dataset.client-files``, a site's
``data-path``) are checked on load: an unreadable or empty file, a missing column, a missing
(null) value or a label outside the run's label set is a ``ValueError`` naming the file, the
row (data rows count from 1; the CSV header is not a row) and the column. Texts of any length
are accepted: tokenization truncates every example to ``dataset.max-length`` tokens.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

datasets.disable_progress_bars()

from fedlora.config import ConfigError, DatasetConfig
from fedlora.process_cache import process_cache
from fedlora.data import chatterbot, wordnet

CLASSIFICATION = "classification"
INSTRUCTION = "instruction"

#: built-in dataset name -> task kind
BUILTIN_DATASETS = {"chatterbot-topics": CLASSIFICATION, "chatterbot-qa": INSTRUCTION,
                    wordnet.SUPERSENSES: CLASSIFICATION, wordnet.DEFINITIONS: INSTRUCTION}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: topics of the classification default: those with enough examples, each capped so
#: that no topic dominates (tech_support alone would otherwise be half the corpus).
TOPIC_MIN_EXAMPLES = 15
TOPIC_MAX_EXAMPLES = 150
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


#: (train, held-out, test); the test split is empty when ``dataset.test-fraction`` is 0
Splits = tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]


@dataclass(frozen=True)
class TaskData:
    """A task's label set, and its train, held-out and test splits in the normalised schema (read on first use)."""

    task: str
    labels: tuple[str, ...]
    load_splits: Callable[[], Splits] = field(repr=False, compare=False)

    @functools.cached_property
    def _splits(self) -> Splits:
        return self.load_splits()

    @property
    def train(self) -> datasets.Dataset:
        return self._splits[0]

    @property
    def heldout(self) -> datasets.Dataset:
        return self._splits[1]

    @property
    def test(self) -> datasets.Dataset:
        return self._splits[2]


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
    """Reject names that are neither built-in, a local data file's path, nor an ``org/name`` hub id.

    A local file need not exist in every process of a run: a site with its own data and a
    declared label set never reads it. It is checked where it is read (:func:`load_task_data`)
    and by the launcher's pre-flight.
    """
    if name in BUILTIN_DATASETS:
        resolve_task(DatasetConfig(name=name, task=task))
        return
    if Path(name).suffix not in LOCAL_SUFFIXES and not _HUB_ID.match(name):
        close = difflib.get_close_matches(name, list(BUILTIN_DATASETS), n=1, cutoff=0.7)
        raise ConfigError(
            f"config key 'dataset.name' = {name!r} is invalid: expected one of "
            f"{', '.join(map(repr, BUILTIN_DATASETS))}, a local .jsonl/.json/.csv/.parquet file, "
            "or a Hugging Face hub id 'org/name'" + (f"; did you mean {close[0]!r}?" if close else "")
        )
    resolve_task(DatasetConfig(name=name, task=task))


def is_hub_dataset(name: str) -> bool:
    """Whether ``dataset.name`` names a hub dataset (neither built-in nor a local file)."""
    return name not in BUILTIN_DATASETS and Path(name).suffix not in LOCAL_SUFFIXES


def client_files(cfg: DatasetConfig) -> list[Path]:
    """The data files of ``dataset.client-files`` (a directory or a glob pattern), sorted: client p reads the p-th."""
    pattern = Path(cfg.client_files).expanduser()
    found = pattern.iterdir() if pattern.is_dir() else map(Path, glob.glob(str(pattern)))
    return sorted(f for f in found if f.suffix in LOCAL_SUFFIXES and f.is_file())


def client_file(cfg: DatasetConfig, partition_id: int, num_partitions: int) -> Path:
    """Simulated client ``partition_id``'s own file; the pattern must match one file per client."""
    files = client_files(cfg)
    if len(files) != num_partitions:
        raise ValueError(f"dataset.client-files = {cfg.client_files!r} matches {len(files)} "
                         f"{'/'.join(LOCAL_SUFFIXES)} file(s); the run has {num_partitions} clients, one file each")
    return files[partition_id]


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
    path = Path(cfg.name).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"config key 'dataset.name' = {cfg.name!r} is invalid: no such file")
        return read_local_file(path)
    return datasets.load_dataset(cfg.name, split=cfg.split)


def _check_values(raw: datasets.Dataset, columns: tuple[str, ...], name: str) -> None:
    """Every row has a value (not null) in each of ``columns``; else a ValueError naming file, row and column."""
    for column in columns:
        empty = next((i for i, v in enumerate(raw[column]) if v is None), None)
        if empty is not None:
            raise ValueError(f"{name}: row {empty + 1}, column {column!r}: missing value")


def _label_names(raw: datasets.Dataset, column: str) -> list[str]:
    """Every row's label as a name: a ClassLabel's names, else the value as text."""
    feature = raw.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.names[i] for i in raw[column]]
    return [str(v) for v in raw[column]]


def _normalise_external(raw: datasets.Dataset, cfg: DatasetConfig, task: str,
                        labels: tuple[str, ...] = ()) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The normalised columns, then every other column of ``raw``; classification labels mapped onto ``labels``
    (default: the file's ClassLabel names, else its sorted label values); a label outside them is a ValueError."""
    wanted = (cfg.text_column, cfg.label_column) if task == CLASSIFICATION else (cfg.prompt_column, cfg.response_column)
    missing = [c for c in wanted if c not in raw.column_names]
    if missing:
        raise ValueError(f"{cfg.name}: missing column(s) {missing}; it has {raw.column_names}")
    if len(raw) == 0:
        raise ValueError(f"{cfg.name}: the dataset has no rows")
    _check_values(raw, wanted, cfg.name)
    if task == INSTRUCTION:
        topic = [str(t) for t in raw["topic"]] if "topic" in raw.column_names else [""] * len(raw)
        normalised = {"prompt": [str(x) for x in raw[cfg.prompt_column]],
                      "response": [str(x) for x in raw[cfg.response_column]], "topic": topic}
    else:
        names = _label_names(raw, cfg.label_column)
        feature = raw.features[cfg.label_column]
        labels = labels or (tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else tuple(sorted(set(names))))
        index = {name: i for i, name in enumerate(labels)}
        unknown = [(row, name) for row, name in enumerate(names) if name not in index]
        if unknown:
            row, label = unknown[0]
            raise ValueError(f"{cfg.name}: row {row + 1}, column {cfg.label_column!r}: label {label!r} is outside the "
                             f"run's label set {list(labels)} ({len(unknown)} row(s) affected)")
        normalised = {"text": [str(x) for x in raw[cfg.text_column]], "label": [index[n] for n in names], "topic": names}
    data = datasets.Dataset.from_dict(normalised)
    extra = [c for c in raw.column_names if c not in normalised]
    if extra:
        data = datasets.concatenate_datasets([data, raw.select_columns(extra)], axis=1)
    return data, labels


def load_site_data(cfg: DatasetConfig, path: str, task: str, labels: tuple[str, ...]) -> datasets.Dataset:
    """A site's (or a simulated client's) own data file in the normalised schema, labels mapped onto ``labels``."""
    file = Path(path)
    if file.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"data-path {path!r}: expected a {', '.join(LOCAL_SUFFIXES)} file")
    if not file.is_file():
        raise ValueError(f"data-path {path!r}: no such file")
    return _normalise_external(read_local_file(file), dataclasses.replace(cfg, name=str(file)), task, labels)[0]


def _full_dataset(cfg: DatasetConfig, task: str) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """All rows of ``dataset.name`` in the normalised schema, and its label set (``dataset.labels`` when declared)."""
    if cfg.name == "chatterbot-topics":
        full, labels = _topics_dataset()
    elif cfg.name == "chatterbot-qa":
        full, labels = datasets.Dataset.from_list(chatterbot.load_pairs()), ()
    elif cfg.name in (wordnet.SUPERSENSES, wordnet.DEFINITIONS):
        full, labels = wordnet.load_wordnet(cfg.name)
    else:
        return _normalise_external(_load_external(cfg), cfg, task, cfg.label_names if task == CLASSIFICATION else ())
    if task == CLASSIFICATION and cfg.label_names and cfg.label_names != labels:
        raise ValueError(f"dataset.labels = {cfg.labels!r} differs from the labels of {cfg.name!r}: {list(labels)}")
    return full, labels


def _split(full: datasets.Dataset, labels: tuple[str, ...], cfg: DatasetConfig, seed: int, task: str) -> Splits:
    """(train, held-out, test): first ``cfg.test_fraction`` as the test split, chosen with ``cfg.split_seed`` (the
    same for every run seed), then ``cfg.eval_fraction`` of the rest held out, chosen with ``seed``; stratified by
    label for classification."""
    stratify = None
    if task == CLASSIFICATION:
        full = full.cast_column("label", datasets.ClassLabel(names=list(labels)))
        stratify = "label"
    test = full.select([])
    if cfg.test_fraction > 0:
        first = full.train_test_split(test_size=cfg.test_fraction, seed=cfg.split_seed, stratify_by_column=stratify)
        full, test = first["train"], first["test"]
    split = full.train_test_split(test_size=cfg.eval_fraction, seed=seed, stratify_by_column=stratify)
    heldout = split["test"]
    if cfg.eval_max_examples and len(heldout) > cfg.eval_max_examples:
        heldout = heldout.select(range(cfg.eval_max_examples))
    return split["train"], heldout, test


@process_cache(maxsize=4)
def load_task_data(cfg: DatasetConfig, seed: int) -> TaskData:
    """The configured dataset's task, label set and splits (cached per process).

    The held-out split is ``cfg.eval_fraction`` of the examples, stratified by label for
    classification, chosen with ``seed``; no client ever trains on it. With ``cfg.test_fraction`` > 0
    a test split is drawn first, with ``cfg.split_seed`` (the same for every run seed). When the label set is
    known without reading the data (declared ``dataset.labels``, or an instruction task), the
    data are read when a split is first used.
    """
    task = resolve_task(cfg)
    if task == INSTRUCTION or cfg.label_names:
        return TaskData(task, cfg.label_names if task == CLASSIFICATION else (),
                        lambda: _split(*_full_dataset(cfg, task), cfg, seed, task))
    full, labels = _full_dataset(cfg, task)
    return TaskData(task, labels, lambda: _split(full, labels, cfg, seed, task))
