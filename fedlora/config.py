"""The run configuration: one typed, validated view of Flower's flat run config.

Flower hands every app a flat ``dict[str, int | float | str | bool]`` built from
``[tool.flwr.app.config]`` in pyproject.toml plus ``--run-config`` overrides, with
nested TOML tables flattened to dotted keys (``lora.rank``). :func:`parse_config`
turns that dict into a frozen :class:`RunConfig`, rejecting unknown keys, wrong types
and out-of-range values with an error that names the key, the bad value and what is
allowed — before any model is loaded or any round starts.

This module knows nothing of the registries: a strategy's own section (``lorafair.*``,
``fedsb.*``) is a dataclass of :func:`knob` fields that the caller passes in
(``sections=``); :func:`fedlora.run_config.load_config` passes every registered one and
checks the names (strategy, model, dataset) against their registries.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """A run-config value is missing, unknown, mistyped or out of range."""


def one_of(*allowed: str) -> Check:
    """Accept only the listed strings."""
    return lambda v: None if v in allowed else f"one of {', '.join(map(repr, allowed))}"


def positive(v: float) -> str | None:
    return None if v > 0 else "a number > 0"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else "a number >= 0"


def unit_fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "a fraction in (0, 1]"


def fraction_or_zero(v: float) -> str | None:
    return None if 0 <= v <= 1 else "a fraction in [0, 1]"


def open_fraction(v: float) -> str | None:
    return None if 0 < v < 1 else "a fraction in (0, 1)"


def below_one(v: float) -> str | None:
    return None if 0 <= v < 1 else "a number in [0, 1)"


def parse_ranks(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def client_rank_list(v: str) -> str | None:
    try:
        ranks = parse_ranks(v)
    except ValueError:
        return "a comma-separated list of positive integers, e.g. '4,8,16'"
    return None if all(r > 0 for r in ranks) else "a comma-separated list of positive integers, e.g. '4,8,16'"


def label_list(v: str) -> str | None:
    names = [x.strip() for x in v.split(",") if x.strip()]
    ok = len(names) == len(set(names)) and (not v.strip() or len(names) >= 2)
    return None if ok else "at least two distinct comma-separated label names, e.g. 'sports,politics,tech' (or empty)"


def report_targets(v: str) -> str | None:
    targets = [x.strip() for x in v.split(",") if x.strip()]
    ok = bool(targets) and set(targets) <= {"none", "tensorboard", "wandb"} and ("none" not in targets or len(targets) == 1)
    return None if ok else "'none', or one or more of 'tensorboard', 'wandb' separated by commas"


def device_name(v: str) -> str | None:
    ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
    return None if ok else "'auto', 'cpu', 'cuda' or 'cuda:N'"


def knob(default: Any, check: Check | None = None, doc: str = "") -> Any:
    """A config field: its default, an optional range check and a one-line doc."""
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    name: str = knob("minilm", doc="built-in name (minilm, smollm2, tiny-bert, tiny-llama), HF hub id or local path")
    dtype: str = knob("auto", one_of("auto", "fp32", "bf16", "fp16"), "dtype the frozen base is loaded in; auto = bf16 "
                                                                      "on CUDA where supported, else fp32 (adapters stay fp32)")
    quantization: str = knob("none", one_of("none", "nf4", "int8"), "quantized frozen base through bitsandbytes: 4-bit "
                                                                     "NF4 with double quantization (QLoRA) or 8-bit")
    gradient_checkpointing: bool = knob(False, doc="recompute each layer's activations in the backward pass "
                                                   "(reentrant, so Opacus' per-sample hooks work): less memory, more time")
    device_map: str = knob("single", one_of("single", "spread"), "single = the whole model on the node's device; "
                                                                 "spread = across every GPU the site makes visible")


@dataclass(frozen=True)
class DatasetConfig:
    name: str = knob("chatterbot-topics", doc="built-in name (chatterbot-topics, chatterbot-qa), HF hub id or local file")
    task: str = knob("auto", one_of("auto", "classification", "instruction"), "task kind; auto for built-ins")
    split: str = knob("train", doc="split to load from a hub dataset")
    text_column: str = knob("text", doc="classification input column")
    label_column: str = knob("label", doc="classification label column")
    prompt_column: str = knob("prompt", doc="instruction prompt column")
    response_column: str = knob("response", doc="instruction response column")
    max_length: int = knob(64, positive, "tokens per example (longer ones are truncated)")
    eval_fraction: float = knob(0.2, open_fraction, "held-out share for server evaluation")
    eval_max_examples: int = knob(0, non_negative, "cap on held-out examples (0 = all)")
    test_fraction: float = knob(0.0, below_one, "share of the dataset kept as a test split, scored once after the "
                                "last round (test_predictions.npz); 0 = none. eval-fraction is then of the rest")
    split_seed: int = knob(0, non_negative, "seed of the test split: the same test examples for every run seed")
    score_test: bool = knob(True, doc="score the test split after the last round; false keeps it out of training "
                                      "only (lr-sweep cells, which must not look at it)")
    local_eval_fraction: float = knob(0.0, below_one, "share of each client's rows it holds out to evaluate on "
                                      "(client evaluation, e.g. personalised models); 0 = evaluate on its training rows")
    labels: str = knob("", label_list, "classification label names in id order, comma-separated; every file is checked "
                                       "against them; empty = the sorted values of dataset.name's label column")
    client_files: str = knob("", doc="simulation: one data file per client, a glob pattern or a directory (sorted; "
                                     "client p trains on the p-th file); empty = partition dataset.name")

    @property
    def label_names(self) -> tuple[str, ...]:
        """The declared label set (``labels``), in id order; empty when not declared."""
        return tuple(x.strip() for x in self.labels.split(",") if x.strip())


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = knob("iid", one_of("iid", "dirichlet", "natural"), "how the train split is divided among clients")
    alpha: float = knob(0.5, positive, "Dirichlet concentration (smaller = more label skew)")
    column: str = knob("topic", doc="column whose values define the natural partitions")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = knob(8, positive, "LoRA rank r")
    alpha: float = knob(16, positive, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = knob(0.0, below_one, "dropout on the LoRA input")
    targets: str = knob("auto", doc="comma-separated module names, or auto (attention query/value)")
    client_ranks: str = knob("", client_rank_list, "per-client ranks for strategies that allow mixed ranks, e.g. '4,8,16' (client p gets entry p mod n); empty = lora.rank for all")

    def rank_of(self, partition_id: int) -> int:
        """This client's LoRA rank r_k."""
        ranks = parse_ranks(self.client_ranks)
        return ranks[partition_id % len(ranks)] if ranks and partition_id >= 0 else self.rank

    @property
    def heterogeneous(self) -> bool:
        return len(set(parse_ranks(self.client_ranks))) > 1

    @property
    def allowed_ranks(self) -> set[int]:
        """Every rank a client of this run may train at."""
        return set(parse_ranks(self.client_ranks)) or {self.rank}


@dataclass(frozen=True)
class DPConfig:
    mode: str = knob("none", one_of("none", "sample", "user"), "differential privacy: none, sample-level on clients (Opacus), user-level at the server")
    noise_multiplier: float = knob(0.0, non_negative, "Gaussian noise multiplier z; 0 with target-epsilon > 0 = calibrate z from the budget")
    target_epsilon: float = knob(0.0, non_negative, "privacy budget ε (0 = no budget; then noise-multiplier must be > 0)")
    delta: float = knob(1e-5, open_fraction, "δ of (ε, δ)-DP")
    max_grad_norm: float = knob(1.0, positive, "clip norm C: per-sample gradients (sample) or client updates (user)")
    grad_sample_mode: str = knob("hooks", one_of("hooks", "ghost"), "Opacus per-sample gradient mode")
    accountant: str = knob("rdp", one_of("rdp", "prv"), "privacy accountant")


@dataclass(frozen=True)
class FaultsConfig:
    dropout: float = knob(0.0, fraction_or_zero, "fault injection: probability a sampled client fails in a training round")
    straggler: float = knob(0.0, fraction_or_zero, "fault injection: probability a sampled client's reply misses round-timeout (discarded as late)")
    corrupt: float = knob(0.0, fraction_or_zero, "fault injection: probability a client's reply is corrupted (NaN/Inf, wrong shape or a missing tensor)")


@dataclass(frozen=True)
class ValidationConfig:
    max_rms: float = knob(10.0, positive, "largest root-mean-square value of any uploaded tensor; replies above it are rejected")
    max_share: float = knob(0.5, unit_fraction, "largest weight p_k of any one client in an average (the excess goes "
                                                "to the others; 1 = no cap)")
    max_norm_ratio: float = knob(5.0, non_negative, "largest norm of a client's update, as a multiple of the other "
                                                    "clients' median; larger ones are scaled down to it (0 = no bound)")


@dataclass(frozen=True)
class MetricsConfig:
    agg_error_every: int = knob(1, non_negative, "compute agg_error in every N-th round (0 = never); exact, it costs "
                                                 "O((d+k)·(K·r)²) per module for the strategies whose error is not "
                                                 "just float32 rounding")


@dataclass(frozen=True)
class EvaluationConfig:
    where: str = knob("server", one_of("server", "clients", "none"), "who evaluates the global adapter each round: the "
                                                                      "server on the held-out split, the fraction-evaluate "
                                                                      "clients on their rows (the server loads no model), "
                                                                      "or nobody")


@dataclass(frozen=True)
class MemoryConfig:
    limit_gb: float = knob(0.0, non_negative, "memory (GiB) a client's model may use on its device; 0 = the device's "
                                              "total (all visible GPUs with model.device-map = spread)")


@dataclass(frozen=True)
class Sections:
    """Strategy config sections by name (``"lorafair"`` -> its frozen options dataclass); hashable."""

    items: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, name: str) -> Any:
        for key, value in self.items:
            if key == name:
                return value
        raise KeyError(f"no config section {name!r}; sections: {[k for k, _ in self.items]}")

    def __contains__(self, name: object) -> bool:
        return any(key == name for key, _ in self.items)


@dataclass(frozen=True)
class RunConfig:
    strategy: str = knob("fedavg", doc="aggregation strategy (fedlora.strategies.registry)")
    num_server_rounds: int = knob(5, positive, "federated rounds")
    fraction_train: float = knob(1.0, unit_fraction, "share of connected clients sampled per round")
    fraction_evaluate: float = knob(0.0, fraction_or_zero, "share of clients that also evaluate the global adapter on their local data")
    weighting: str = knob("num-examples", one_of("num-examples", "uniform"), "client weights p_k in every average")
    min_clients: int = knob(1, positive, "fewest replies a round needs to aggregate")
    round_timeout: float = knob(600.0, positive, "seconds to wait for clients in a round")
    local_steps: int = knob(20, positive, "optimizer steps per client per round")
    batch_size: int = knob(16, positive, "examples per local step")
    optimizer: str = knob("adamw", one_of("adamw", "sgd"), "client optimizer")
    lr: float = knob(5e-3, positive, "client learning rate")
    weight_decay: float = knob(0.0, non_negative, "client weight decay")
    seed: int = knob(42, non_negative, "seed for initialisation, partitioning, sampling and training")
    output_dir: str = knob("", doc="run directory; empty = runs/<timestamp>-<strategy>")
    resume_from: str = knob("", doc="run directory to continue from its last checkpoint; empty = a new run")
    device: str = knob("auto", device_name, "compute device")
    precision: str = knob("auto", one_of("auto", "fp32", "bf16", "fp16"), "autocast precision on CUDA")
    report_to: str = knob("none", report_targets, "where per-round metrics also go: none, tensorboard, wandb "
                                                  "(comma-separated), beside metrics.jsonl")
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sections: Sections = field(default_factory=Sections)

    def __post_init__(self) -> None:
        check_combinations(self)

    def section(self, name: str) -> Any:
        """The options of strategy section ``name`` (e.g. ``cfg.section("lorafair").lambda_``)."""
        return self.sections[name]

    def to_flat(self) -> dict[str, Any]:
        """The config as Flower's flat dotted-key dict (what config.json stores), sections included."""
        return dict(_flatten(self))


def check_combinations(cfg: RunConfig) -> None:
    """Core keys that cannot work together (no registry needed): :class:`ConfigError` naming both keys."""
    where, share = cfg.evaluation.where, cfg.fraction_evaluate
    if where == "clients" and share == 0:
        raise ConfigError("config keys 'evaluation.where' = 'clients' and 'fraction-evaluate' = 0.0 are incompatible: "
                          "set fraction-evaluate > 0, the share of clients that evaluate after every round")
    if cfg.dataset.test_fraction > 0 and cfg.dataset.score_test and where != "server":
        raise ConfigError(f"config keys 'dataset.test-fraction' = {cfg.dataset.test_fraction} and 'evaluation.where' = "
                          f"{where!r} are incompatible: the server scores the test split, so it must hold the model; "
                          "use evaluation.where = 'server'")
    if where == "none" and share > 0:
        raise ConfigError(f"config keys 'evaluation.where' = 'none' and 'fraction-evaluate' = {share} are incompatible: "
                          "nobody evaluates with 'none'; use 'clients' or set fraction-evaluate = 0")
    if cfg.dp.mode == "sample" and cfg.model.dtype == "fp16":
        raise ConfigError("config keys 'dp.mode' = 'sample' and 'model.dtype' = 'fp16' are incompatible: fp16 gradients "
                          "need loss scaling, which breaks per-example clipping; use 'bf16' or 'fp32'")
    if cfg.model.device_map == "spread" and cfg.device == "cpu":
        raise ConfigError("config keys 'model.device-map' = 'spread' and 'device' = 'cpu' are incompatible: spread "
                          "places the model across the site's visible GPUs; use device = 'cuda' or 'auto'")


def _key(name: str) -> str:
    """Field name -> config key: ``local_steps`` -> ``local-steps``, ``lambda_`` -> ``lambda``."""
    return name.rstrip("_").replace("_", "-")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + _key(f.name)
        if isinstance(value, Sections):
            for name, options in value.items:
                items.extend(_flatten(options, name + "."))
        elif dataclasses.is_dataclass(value):
            items.extend(_flatten(value, key + "."))
        else:
            items.append((key, value))
    return items


SectionTypes = Mapping[str, type]


def default_sections(sections: SectionTypes) -> Sections:
    """Every section at its defaults."""
    return Sections(tuple((name, cls()) for name, cls in sorted(sections.items())))


def default_flat_config(sections: SectionTypes | None = None) -> dict[str, Any]:
    """Every key with its default value (core keys plus those of ``sections``)."""
    return RunConfig(sections=default_sections(sections or {})).to_flat()


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        expected = "a boolean"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        expected = "an integer"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    else:
        if isinstance(value, str):
            return value
        expected = "a string (quote it: key='value')"
    raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def _build(cls: type, flat: Mapping[str, Any], prefix: str) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + _key(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, Sections):
            continue
        if dataclasses.is_dataclass(default):
            kwargs[f.name] = _build(type(default), flat, key + ".")
            continue
        if key not in flat:
            continue
        value = _coerce(key, flat[key], default)
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {problem}")
        kwargs[f.name] = value
    return cls(**kwargs)


def unknown_key_message(key: str, known: Mapping[str, Any]) -> str:
    """One line for an unknown key: the closest known keys (``difflib``), else where the known keys are listed."""
    close = difflib.get_close_matches(key, list(known), n=2, cutoff=0.75)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "not a fedlora key"
    return f"unknown config key {key!r}: {hint} (the known keys are in pyproject.toml [tool.flwr.app.config])"


def parse_config(flat: Mapping[str, Any], sections: SectionTypes | None = None) -> RunConfig:
    """Validate Flower's flat run config and return the typed :class:`RunConfig`.

    ``sections`` maps a strategy section name to its options dataclass; keys under
    ``<name>.`` are parsed into it. Missing keys take their defaults. Raises
    :class:`ConfigError` naming the key, the value and what is allowed, for unknown keys,
    wrong types and out-of-range values. Names (strategy, model, dataset) are checked by
    :func:`fedlora.run_config.load_config`, which knows the registries.
    """
    sections = dict(sections or {})
    known = default_flat_config(sections)
    unknown = sorted(set(flat) - set(known))
    if unknown:
        raise ConfigError("; ".join(unknown_key_message(key, known) for key in unknown))
    cfg = _build(RunConfig, flat, "")
    parsed = Sections(tuple((name, _build(cls, flat, name + ".")) for name, cls in sorted(sections.items())))
    return dataclasses.replace(cfg, sections=parsed)
