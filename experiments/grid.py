"""A sweep grid: strategies × partitions × privacy levels × seeds over one shared base config.

A grid file (TOML) looks like::

    name = "minilm-small"
    num-clients = 4
    strategies = "all"           # every registered strategy (the default), or a list of names
    partitions = ["iid", "dirichlet-0.1", "dirichlet-0.5", "natural"]
    privacy = ["none", "eps-8", "eps-3"]
    seeds = [0, 1, 2]
    private-seeds = [0]          # optional: seeds for the private cells (default: seeds)
    baselines = true             # centralized + local-only reference runs (default: true)

    [base]                       # run-config overrides shared by every cell
    "model.name" = "minilm"
    num-server-rounds = 3

Every cell gets exactly the base config plus its own partition, privacy, strategy and seed
keys, so all strategies in a (partition, privacy, seed) cell share partitions, seeds,
rounds and local-step budgets. ``eps-E`` means sample-level DP (Opacus) calibrated to a
cumulative budget ε = E over the whole run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.strategies.registry import names

BASELINES = ("centralized", "local-only")
ALL = "all"


def strategy_names(raw: object) -> list[str]:
    """The grid's strategies: ``"all"`` (every registered one) or a list of registered names."""
    known = names()
    if raw == ALL:
        return known
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"strategies = {raw!r}: expected {ALL!r} or a non-empty list of names")
    unknown = [s for s in raw if s not in known]
    if unknown:
        raise ValueError(f"strategies {unknown} are not registered; registered: {known}")
    return [str(s) for s in raw]


def partition_overrides(name: str) -> dict[str, Any]:
    """Run-config keys for a partition name: ``iid``, ``natural`` or ``dirichlet-<alpha>``."""
    if name in ("iid", "natural"):
        return {"partition.kind": name}
    if name.startswith("dirichlet-"):
        return {"partition.kind": "dirichlet", "partition.alpha": float(name.removeprefix("dirichlet-"))}
    raise ValueError(f"partition {name!r} is not 'iid', 'natural' or 'dirichlet-<alpha>'")


def privacy_overrides(name: str) -> dict[str, Any]:
    """Run-config keys for a privacy name: ``none`` or ``eps-<epsilon>`` (sample-level DP)."""
    if name == "none":
        return {"dp.mode": "none"}
    if name.startswith("eps-"):
        return {"dp.mode": "sample", "dp.target-epsilon": float(name.removeprefix("eps-"))}
    raise ValueError(f"privacy {name!r} is not 'none' or 'eps-<epsilon>'")


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a strategy (or baseline) in one partition × privacy setting with one seed."""

    strategy: str
    partition: str
    privacy: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}__{self.partition}__{self.privacy}__s{self.seed}"

    @property
    def is_baseline(self) -> bool:
        return self.strategy in BASELINES

    def label(self) -> str:
        return f"({self.strategy}, {self.partition}, {self.privacy}, seed {self.seed})"


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    name: str
    num_clients: int
    strategies: list[str]
    partitions: list[str]
    privacy: list[str]
    seeds: list[int]
    private_seeds: list[int]
    baselines: bool
    base: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Cells grouped by setting, so that a sweep cut short still holds complete comparisons.

        Order: privacy level, seed, partition, then the strategies side by side. Baselines are
        non-private and sit with the non-private cells of their seed (the first level when the
        grid has no ``none``): centralized once per seed
        (its pooled data is the same for every partition; recorded under partition ``pooled``)
        before that seed's partitions, local-only after each partition's strategies.
        """
        cells = []
        baseline_level = "none" if "none" in self.privacy else self.privacy[0]
        for privacy in self.privacy:
            baselines = self.baselines and privacy == baseline_level
            for seed in self.seeds if privacy == "none" else self.private_seeds:
                if baselines:
                    cells.append(Cell("centralized", "pooled", "none", seed))
                for partition in self.partitions:
                    cells += [Cell(s, partition, privacy, seed) for s in self.strategies]
                    if baselines:
                        cells.append(Cell("local-only", partition, "none", seed))
        return cells

    def overrides(self, cell: Cell) -> dict[str, Any]:
        """The flat run config of ``cell`` (without ``output-dir``)."""
        config = {**self.base, "seed": cell.seed}
        if not cell.is_baseline:
            config["strategy"] = cell.strategy
        if cell.partition != "pooled":
            config.update(partition_overrides(cell.partition))
        config.update(privacy_overrides(cell.privacy))
        return config


def load_grid(path: Path) -> Grid:
    """Parse and check a grid TOML file."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    known = {"name", "num-clients", "strategies", "partitions", "privacy", "seeds", "private-seeds", "baselines", "base"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown grid key(s) {unknown}; known: {sorted(known)}")
    seeds = [int(s) for s in raw.get("seeds", [42])]
    grid = Grid(
        name=str(raw.get("name", Path(path).stem)),
        num_clients=int(raw.get("num-clients", 4)),
        strategies=strategy_names(raw.get("strategies", ALL)),
        partitions=list(raw.get("partitions", ["iid"])),
        privacy=[str(p) for p in raw.get("privacy", ["none"])],
        seeds=seeds,
        private_seeds=[int(s) for s in raw.get("private-seeds", seeds)],
        baselines=bool(raw.get("baselines", True)),
        base=dict(raw.get("base", {})),
    )
    for partition in grid.partitions:
        partition_overrides(partition)
    for privacy in grid.privacy:
        privacy_overrides(privacy)
    return grid
