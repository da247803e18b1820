"""A grid file: one or more studies, each methods × partitions × privacy levels × seeds over a shared base config.

A grid file (TOML)::

    name = "wordnet-minilm"
    num-clients = 4
    reference = "fedavg"                 # every paired difference is taken against it (default fedavg)

    [base]                               # run-config keys shared by every cell of every study
    "model.name" = "minilm"

    [[study]]
    name = "heterogeneity"
    strategies = "all"                   # every registered strategy (default), or a list of names
    equal-upload = ["fedsb", "ffa"]      # variants at the rank whose upload per round matches the reference's
    partitions = ["iid", "dirichlet-1", "dirichlet-0.3", "dirichlet-0.1"]   # iid, natural, dirichlet-<alpha>
    privacy = ["none"]                   # none, eps-<E> (sample-level DP, cumulative budget E)
    seeds = [0, 1, 2, 3, 4]
    private-seeds = [0, 1, 2, 3, 4]      # the private cells' seeds, partitions and methods (default: all of
    private-partitions = ["iid"]         #   the study's): a study is partitions × privacy, with its private
    private-methods = ["fedavg", "ffa"]  #   levels restricted to these
    baselines = ["centralized"]          # true (centralized + local-only), false, or a list
    [study.base]                         # this study's own run-config keys (override the grid's)
    batch-size = 16
    [study.lr-sweep]                     # each method's lr, chosen on the validation split (optional)
    values = [0.002, 0.005, 0.01]
    seeds = [100]                        # seeds of the sweep cells (apart from the main seeds)
    partitions = ["dirichlet-0.3"]       # where the non-private sweep runs (default: the study's first partition)
    private-partitions = ["iid"]         # where the private one runs (default: the first private partition)
    privacy = ["none", "eps-3"]          # one level per privacy class (none; one eps-E stands for every eps-*)

A file without ``[[study]]`` tables is the older single-study form: ``strategies``,
``partitions``, ``privacy``, ``seeds``, ``private-seeds`` and ``baselines`` at the top level;
it is one study named ``""`` whose run directories sit directly under ``runs/``.

Every cell of a study gets exactly the grid's ``[base]``, the study's ``base`` and its own
partition, privacy, method, seed and learning-rate keys, so all methods in a (partition,
privacy, seed) setting share partitions, seeds, rounds and local-step budgets. A *method*
is a registered strategy, an equal-upload variant (``<strategy>@<reference>-upload``), or a
baseline (``centralized``, ``local-only``). Sweep cells keep the test split out of training but
never score it (``dataset.score-test = false``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.strategies.registry import names

BASELINES = ("centralized", "local-only")
ALL = "all"
POOLED = "pooled"
NONE = "none"
DEFAULT_REFERENCE = "fedavg"
STUDY_KEYS = {"name", "strategies", "equal-upload", "partitions", "privacy", "seeds", "private-seeds",
              "private-partitions", "private-methods", "baselines", "base", "lr-sweep"}
LEGACY_KEYS = {"strategies", "partitions", "privacy", "seeds", "private-seeds", "baselines"}
GRID_KEYS = {"name", "num-clients", "reference", "base", "study"}
SWEEP_KEYS = {"values", "seeds", "partitions", "private-partitions", "privacy"}


class GridError(ValueError):
    """A grid file is malformed: the message names the file, the key and what is allowed."""


def strategy_names(raw: object) -> list[str]:
    """The study's strategies: ``"all"`` (every registered one) or a list of registered names."""
    known = names()
    if raw == ALL:
        return known
    if not isinstance(raw, list) or not raw:
        raise GridError(f"strategies = {raw!r}: expected {ALL!r} or a non-empty list of names")
    unknown = [s for s in raw if s not in known]
    if unknown:
        raise GridError(f"strategies {unknown} are not registered; registered: {known}")
    return [str(s) for s in raw]


def partition_overrides(name: str) -> dict[str, Any]:
    """Run-config keys for a partition name: ``iid``, ``natural`` or ``dirichlet-<alpha>`` (``pooled``: none)."""
    if name == POOLED:
        return {}
    if name in ("iid", "natural"):
        return {"partition.kind": name}
    if name.startswith("dirichlet-"):
        try:
            return {"partition.kind": "dirichlet", "partition.alpha": float(name.removeprefix("dirichlet-"))}
        except ValueError:
            pass
    raise GridError(f"partition {name!r} is not 'iid', 'natural' or 'dirichlet-<alpha>'")


def privacy_overrides(name: str) -> dict[str, Any]:
    """Run-config keys for a privacy name: ``none`` or ``eps-<epsilon>`` (sample-level DP)."""
    if name == NONE:
        return {"dp.mode": "none"}
    if name.startswith("eps-"):
        try:
            return {"dp.mode": "sample", "dp.target-epsilon": float(name.removeprefix("eps-"))}
        except ValueError:
            pass
    raise GridError(f"privacy {name!r} is not 'none' or 'eps-<epsilon>'")


def privacy_class(privacy: str) -> str:
    """``none`` for non-private levels, ``private`` for every ``eps-E``: the classes an lr is chosen for."""
    return NONE if privacy == NONE else "private"


def epsilon_of(privacy: str) -> float:
    """The budget ε of a privacy level (``inf`` for ``none``)."""
    return float("inf") if privacy == NONE else float(privacy.removeprefix("eps-"))


def alpha_of(partition: str) -> float:
    """The Dirichlet α of a partition (``inf`` for iid; NaN for natural and pooled)."""
    if partition == "iid":
        return float("inf")
    if partition.startswith("dirichlet-"):
        return float(partition.removeprefix("dirichlet-"))
    return float("nan")


@dataclass(frozen=True)
class Variant:
    """A strategy run at the rank whose upload per training round matches ``reference``'s at ``lora.rank``."""

    strategy: str
    reference: str

    @property
    def label(self) -> str:
        return f"{self.strategy}@{self.reference}-upload"


@dataclass(frozen=True)
class LrSweep:
    """Learning rates to try, and the seeds, partitions and representative privacy levels to try them in."""

    values: tuple[float, ...]
    seeds: tuple[int, ...]
    partitions: tuple[str, ...]
    private_partitions: tuple[str, ...]
    privacy: tuple[str, ...]

    def level_for(self, privacy: str) -> str:
        """The sweep level whose choice a main cell at ``privacy`` uses (same privacy class)."""
        return next(p for p in self.privacy if privacy_class(p) == privacy_class(privacy))

    def partitions_at(self, privacy: str) -> tuple[str, ...]:
        return self.partitions if privacy == NONE else self.private_partitions


@dataclass(frozen=True)
class Cell:
    """One run: a method in one (partition, privacy) setting of a study with one seed; ``lr`` set for sweep cells."""

    study: str
    method: str
    partition: str
    privacy: str
    seed: int
    lr: float | None = None

    @property
    def name(self) -> str:
        base = f"{self.method}__{self.partition}__{self.privacy}__s{self.seed}"
        return base if self.lr is None else f"{base}__lr{self.lr:g}"

    @property
    def is_baseline(self) -> bool:
        return self.method in BASELINES

    @property
    def is_sweep(self) -> bool:
        return self.lr is not None

    def label(self) -> str:
        where = f"{self.study}: " if self.study else ""
        lr = f", lr {self.lr:g}" if self.lr is not None else ""
        return f"({where}{self.method}, {self.partition}, {self.privacy}, seed {self.seed}{lr})"


@dataclass(frozen=True)
class Study:
    """One factorial block of a grid (see the module docstring)."""

    name: str
    strategies: tuple[str, ...]
    variants: tuple[Variant, ...]
    partitions: tuple[str, ...]
    privacy: tuple[str, ...]
    seeds: tuple[int, ...]
    private_seeds: tuple[int, ...]
    private_partitions: tuple[str, ...]
    private_methods: tuple[str, ...]
    baselines: tuple[str, ...]
    base: dict[str, Any] = field(default_factory=dict)
    lr_sweep: LrSweep | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        """The federated methods: strategies, then variants."""
        return self.strategies + tuple(v.label for v in self.variants)

    def methods_at(self, privacy: str) -> tuple[str, ...]:
        return self.methods if privacy == NONE else self.private_methods

    def partitions_at(self, privacy: str) -> tuple[str, ...]:
        return self.partitions if privacy == NONE else self.private_partitions

    def seeds_at(self, privacy: str) -> tuple[int, ...]:
        return self.seeds if privacy == NONE else self.private_seeds

    def variant(self, method: str) -> Variant | None:
        return next((v for v in self.variants if v.label == method), None)

    def strategy_of(self, method: str) -> str | None:
        """The registered strategy a method runs (None for a baseline)."""
        variant = self.variant(method)
        return variant.strategy if variant else (None if method in BASELINES else method)

    def sweep_cells(self) -> list[Cell]:
        """Every lr-sweep cell: methods and baselines × representative levels × partitions × seeds × lr values.

        Baselines are non-private: they are swept at ``none`` only.
        """
        sweep = self.lr_sweep
        if sweep is None:
            return []
        cells = []
        for privacy in sweep.privacy:
            for seed in sweep.seeds:
                for partition in sweep.partitions_at(privacy):
                    for method in self.methods_at(privacy):
                        cells += [Cell(self.name, method, partition, privacy, seed, lr) for lr in sweep.values]
                    if privacy == NONE and "local-only" in self.baselines:
                        cells += [Cell(self.name, "local-only", partition, NONE, seed, lr) for lr in sweep.values]
                if privacy == NONE and "centralized" in self.baselines:
                    cells += [Cell(self.name, "centralized", POOLED, NONE, seed, lr) for lr in sweep.values]
        return cells

    def main_cells(self) -> list[Cell]:
        """Cells grouped by seed, so that a sweep cut short holds every setting with its first seeds.

        Order: seed, privacy level, partition, then the methods side by side. Baselines are
        non-private and sit with the non-private cells of their seed (the first level when the
        study has no ``none``): centralized once per seed (its pooled data is the same for every
        partition; recorded under partition ``pooled``) before that seed's partitions, local-only
        after each partition's methods.
        """
        cells = []
        baseline_level = NONE if NONE in self.privacy else self.privacy[0]
        for seed in dict.fromkeys(self.seeds + self.private_seeds):
            for privacy in self.privacy:
                if seed not in self.seeds_at(privacy):
                    continue
                with_baselines = privacy == baseline_level
                if with_baselines and "centralized" in self.baselines:
                    cells.append(Cell(self.name, "centralized", POOLED, NONE, seed))
                for partition in self.partitions_at(privacy):
                    cells += [Cell(self.name, m, partition, privacy, seed) for m in self.methods_at(privacy)]
                    if with_baselines and "local-only" in self.baselines:
                        cells.append(Cell(self.name, "local-only", partition, NONE, seed))
        return cells

    def cells(self) -> list[Cell]:
        """Sweep cells first (the main cells use their choice), then the main cells."""
        return self.sweep_cells() + self.main_cells()


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    name: str
    num_clients: int
    reference: str
    studies: tuple[Study, ...]
    base: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        return [cell for study in self.studies for cell in study.cells()]

    def study(self, name: str) -> Study:
        return next(s for s in self.studies if s.name == name)

    def overrides(self, cell: Cell, lr: float | None = None, variant_keys: dict[str, Any] | None = None) -> dict[str, Any]:
        """The flat run config of ``cell`` without ``output-dir``: ``lr`` is the sweep's choice for a main cell,
        ``variant_keys`` the resolved LoRA keys of a variant (:mod:`fedlora.experiments.variants`)."""
        study = self.study(cell.study)
        config = {**self.base, **study.base, "seed": cell.seed}
        strategy = study.strategy_of(cell.method)
        if strategy is not None:
            config["strategy"] = strategy
        if study.variant(cell.method) is not None:
            if variant_keys is None:
                raise ValueError(f"{cell.label()}: a variant's LoRA keys must be resolved first")
            config.update(variant_keys)
        config.update(partition_overrides(cell.partition))
        config.update(privacy_overrides(cell.privacy))
        chosen = cell.lr if cell.lr is not None else lr
        if chosen is not None:
            config["lr"] = chosen
        if cell.is_sweep:
            config["dataset.score-test"] = False
        return config


def _seeds(raw: object, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and s >= 0 for s in raw):
        raise GridError(f"{where} = {raw!r}: expected a non-empty list of non-negative integers")
    return tuple(raw)


def _baselines(raw: object) -> tuple[str, ...]:
    if raw is True:
        return BASELINES
    if raw is False:
        return ()
    if isinstance(raw, list) and set(raw) <= set(BASELINES):
        return tuple(b for b in BASELINES if b in raw)
    raise GridError(f"baselines = {raw!r}: expected true, false or a list of {list(BASELINES)}")


def _lr_sweep(raw: object, study: str, partitions: tuple[str, ...], private_partitions: tuple[str, ...],
              privacy: tuple[str, ...]) -> LrSweep | None:
    if raw is None:
        return None
    where = f"study {study!r} lr-sweep"
    if not isinstance(raw, dict):
        raise GridError(f"{where}: expected a table with {sorted(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; known: {sorted(SWEEP_KEYS)}")
    values = raw.get("values")
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) and v > 0 for v in values):
        raise GridError(f"{where}: values = {values!r}: expected a non-empty list of learning rates > 0")
    default_levels = list(dict.fromkeys(next(p for p in privacy if privacy_class(p) == c)
                                        for c in dict.fromkeys(map(privacy_class, privacy))))
    sweep = LrSweep(values=tuple(float(v) for v in values), seeds=_seeds(raw.get("seeds", [1000]), f"{where} seeds"),
                    partitions=tuple(raw.get("partitions", [partitions[0]])),
                    private_partitions=tuple(raw.get("private-partitions", [private_partitions[0]])),
                    privacy=tuple(raw.get("privacy", default_levels)))
    for partition in sweep.partitions + sweep.private_partitions:
        partition_overrides(partition)
    classes = [privacy_class(p) for p in sweep.privacy]
    for level in sweep.privacy:
        privacy_overrides(level)
    if len(classes) != len(set(classes)):
        raise GridError(f"{where}: privacy = {list(sweep.privacy)}: at most one level per class (none, and one eps-E)")
    missing = sorted({privacy_class(p) for p in privacy} - set(classes))
    if missing:
        raise GridError(f"{where}: privacy = {list(sweep.privacy)} has no level for the study's {missing} cells")
    return sweep


def _study(raw: dict[str, Any], default_name: str, reference: str, path: Path) -> Study:
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise GridError(f"{path}: study {raw.get('name', default_name)!r}: unknown key(s) {unknown}; known: {sorted(STUDY_KEYS)}")
    name = str(raw.get("name", default_name))
    strategies = tuple(strategy_names(raw.get("strategies", ALL)))
    equal = raw.get("equal-upload", [])
    if not isinstance(equal, list) or not set(equal) <= set(names()):
        raise GridError(f"{path}: study {name!r}: equal-upload = {equal!r}: expected a list of registered strategies")
    partitions = tuple(str(p) for p in raw.get("partitions", ["iid"]))
    privacy = tuple(str(p) for p in raw.get("privacy", [NONE]))
    for partition in partitions:
        partition_overrides(partition)
    for level in privacy:
        privacy_overrides(level)
    seeds = _seeds(raw.get("seeds", [42]), f"study {name!r} seeds")
    private_partitions = tuple(str(p) for p in raw.get("private-partitions", partitions))
    variants = tuple(Variant(s, reference) for s in equal)
    methods = strategies + tuple(v.label for v in variants)
    private_methods = tuple(str(m) for m in raw.get("private-methods", methods))
    if not set(private_partitions) <= set(partitions) or not set(private_methods) <= set(methods):
        raise GridError(f"{path}: study {name!r}: private-partitions {list(private_partitions)} and private-methods "
                        f"{list(private_methods)} must be among its partitions {list(partitions)} and methods "
                        f"{list(methods)}")
    base = raw.get("base", {})
    if not isinstance(base, dict):
        raise GridError(f"{path}: study {name!r}: base must be a table of run-config keys")
    study = Study(
        name=name, strategies=strategies, variants=variants, partitions=partitions, privacy=privacy, seeds=seeds,
        private_seeds=_seeds(raw.get("private-seeds", list(seeds)), f"study {name!r} private-seeds"),
        private_partitions=private_partitions, private_methods=private_methods,
        baselines=_baselines(raw.get("baselines", True)), base=dict(base),
        lr_sweep=_lr_sweep(raw.get("lr-sweep"), name, partitions, private_partitions, privacy),
    )
    if study.lr_sweep and study.baselines and NONE not in study.lr_sweep.privacy:
        raise GridError(f"{path}: study {name!r}: the baselines are non-private, so lr-sweep privacy must include 'none'")
    if study.lr_sweep and set(study.lr_sweep.seeds) & (set(study.seeds) | set(study.private_seeds)):
        raise GridError(f"{path}: study {name!r}: lr-sweep seeds {list(study.lr_sweep.seeds)} overlap the main seeds; "
                        "choose the lr on seeds whose results are not reported")
    return study


def load_grid(path: Path) -> Grid:
    """Parse and check a grid TOML file (either form, see the module docstring)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"{path}: not valid TOML: {err}") from None
    studies_raw = raw.get("study")
    allowed = GRID_KEYS if studies_raw is not None else GRID_KEYS | LEGACY_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        hint = " (with [[study]] tables these keys go inside each study)" if set(unknown) & LEGACY_KEYS else ""
        raise GridError(f"{path}: unknown grid key(s) {unknown}; known: {sorted(allowed)}{hint}")
    reference = str(raw.get("reference", DEFAULT_REFERENCE))
    if reference not in names():
        raise GridError(f"{path}: reference = {reference!r} is not a registered strategy; registered: {names()}")
    if studies_raw is None:
        studies = [_study({k: raw[k] for k in LEGACY_KEYS if k in raw}, "", reference, path)]
    elif isinstance(studies_raw, list) and studies_raw:
        studies = [_study(s, f"study-{i + 1}", reference, path) for i, s in enumerate(studies_raw)]
    else:
        raise GridError(f"{path}: study must be one or more [[study]] tables")
    study_names = [s.name for s in studies]
    if len(set(study_names)) != len(study_names):
        raise GridError(f"{path}: study names {study_names} must be distinct")
    base = raw.get("base", {})
    if not isinstance(base, dict):
        raise GridError(f"{path}: base must be a table of run-config keys")
    return Grid(name=str(raw.get("name", path.stem)), num_clients=int(raw.get("num-clients", 4)),
                reference=reference, studies=tuple(studies), base=dict(base))
