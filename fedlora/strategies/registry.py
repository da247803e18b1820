"""The one list of aggregation strategies: each registers itself once, with what it can do.

A strategy is a package ``fedlora/strategies/<name>/`` whose ``__init__.py`` calls
:func:`register` with a :class:`StrategySpec`: its name, the server part and the client
part (as ``"module:attribute"`` strings, imported only by the side that needs them, so a
client never imports server code), its :class:`Capabilities`, its config section and its
row of the documentation table. :func:`strategies` finds every package under
``fedlora.strategies`` and every installed plug-in that declares the entry point group
``fedlora.strategies`` (a module that calls :func:`register` when imported).

Everything that needs the list of strategies — config validation, client dispatch,
user-level DP, the tests, the experiment grid, the bytes benchmark, the docs table —
derives it from here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from fedlora.config import ConfigError, RunConfig

ENTRY_POINT_GROUP = "fedlora.strategies"


@dataclass(frozen=True)
class Capabilities:
    """What a strategy supports; config validation and the privacy layer read these, nothing else.

    * ``exact``: the applied update equals the ideal Σ_k p_k s_k B_k A_k of the round (its
      ``agg_error`` is zero up to float32 rounding);
    * ``heterogeneous_ranks``: clients of different LoRA ranks (``lora.client-ranks``) are
      aggregated as the strategy intends;
    * ``linear``: the server releases one (weighted) linear average of the uploads, which is
      what user-level DP's clip-and-noise protects; when False, ``not_linear`` says why;
    * ``setup_round``: a phase before round 1 whose uploads the server averages linearly
      (Fed-SB's gradient round) — a release of client data under DP, accounted as such;
    * ``needs_dense_base``: why the strategy cannot run on a quantized base (``model.quantization``),
      or empty when it can.
    """

    exact: bool = False
    heterogeneous_ranks: bool = False
    linear: bool = False
    not_linear: str = ""
    setup_round: bool = False
    needs_dense_base: str = ""

    def __post_init__(self) -> None:
        if not self.linear and not self.not_linear:
            raise ValueError("a strategy that is not linear must say why (Capabilities.not_linear)")


@dataclass(frozen=True)
class DocsRow:
    """The strategy's row of the table in README.md and docs/strategies.md (``inexact``: how, when not exact)."""

    idea: str
    up: str
    down: str
    inexact: str = ""


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy.

    ``server`` names a :class:`fedlora.server.strategy.ServerStrategy` subclass and
    ``client`` a :class:`fedlora.client.role.ClientRole` subclass, each as
    ``"package.module:Name"``. ``options`` is the frozen dataclass of the strategy's config
    section ``<name>.*`` (fields made with :func:`fedlora.config.knob`), or None.

    ``traffic`` names the strategy's byte contract, a pure function
    ``traffic(direction, server_round, adapter, clients) -> {name: shape}``: exactly the
    arrays one client sends (``direction = "up"``) or receives (``"down"``) in
    ``server_round`` (0 = the setup phase), given the shapes of the run's initial adapter
    (``adapter``: peft names, A r×k, B d×r, the head) when ``clients`` clients take part in
    every round at the same rank. Arrays of records other than the adapter's own (``arrays``)
    are named ``<record>/<name>`` (e.g. ``merge-1/<module>.lora_A.weight``). Flower's byte
    count follows from it exactly: per array, its values (4 bytes each, 8 for a weighted stack's
    float64 coefficients: :func:`fedlora.strategies.traffic.payload_bytes`), a 128-byte npy
    header and the length of ``<name>``.

    ``check`` validates settings only this strategy cares about (raising
    :class:`~fedlora.config.ConfigError`); config validation calls it after the capability checks.
    """

    name: str
    server: str
    client: str
    capabilities: Capabilities
    docs: DocsRow
    traffic: str
    options: type | None = None
    check: Callable[[RunConfig], None] | None = None
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def traffic_formula(self) -> Callable[[str, int, dict[str, tuple[int, ...]], int], dict[str, tuple[int, ...]]]:
        """The byte contract (imported on first use)."""
        return self._load("traffic")

    def server_class(self) -> type:
        """The server part (imported on first use)."""
        return self._load("server")

    def client_role(self) -> Any:
        """One instance of the client part (imported and built on first use)."""
        if "role" not in self._loaded:
            self._loaded["role"] = self._load("client")()
        return self._loaded["role"]

    def _load(self, part: str) -> Any:
        if part not in self._loaded:
            module, _, attribute = getattr(self, part).partition(":")
            self._loaded[part] = getattr(importlib.import_module(module), attribute)
        return self._loaded[part]


_REGISTERED: dict[str, StrategySpec] = {}


def register(spec: StrategySpec) -> StrategySpec:
    """Add ``spec`` to the registry (called by the strategy's package when it is imported)."""
    known = _REGISTERED.get(spec.name)
    if known is not None and (known.server, known.client) != (spec.server, spec.client):
        raise ValueError(f"strategy {spec.name!r} is registered twice ({known.server} and {spec.server})")
    _REGISTERED[spec.name] = spec
    return spec


@cache
def _discover() -> None:
    """Import every strategy package under ``fedlora.strategies`` and every installed plug-in, once."""
    package = importlib.import_module("fedlora.strategies")
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if module.ispkg:
            importlib.import_module(module.name)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def strategies() -> dict[str, StrategySpec]:
    """Every registered strategy by name, sorted by name."""
    _discover()
    return dict(sorted(_REGISTERED.items()))


def names() -> list[str]:
    return list(strategies())


def spec_of(name: str) -> StrategySpec:
    """The registered strategy ``name``; ``KeyError`` listing the known names otherwise."""
    known = strategies()
    if name not in known:
        raise KeyError(f"unknown strategy {name!r}; registered: {', '.join(map(repr, known))}")
    return known[name]


def client_ranks_within_rank(cfg: RunConfig) -> None:
    """For strategies whose global adapter has rank ``lora.rank``: every client rank must be at most that."""
    above = sorted(r for r in cfg.lora.allowed_ranks if r > cfg.lora.rank)
    if above:
        raise ConfigError(f"config keys 'lora.client-ranks' = {cfg.lora.client_ranks!r} and 'lora.rank' = {cfg.lora.rank} "
                          f"are incompatible for strategy={cfg.strategy!r}: client ranks {above} exceed the global "
                          f"rank lora.rank; raise lora.rank to at least {above[-1]}")


def option_sections() -> dict[str, type]:
    """Config section name -> options dataclass, for every strategy that has one."""
    return {name: spec.options for name, spec in strategies().items() if spec.options is not None}
