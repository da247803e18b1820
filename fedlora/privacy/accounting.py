"""Privacy accounting: noise calibration and a persistent, cumulative per-node history.

Every DP-SGD step of a node is a subsampled Gaussian mechanism with noise multiplier σ
and sampling rate q; ``k`` such steps form one history entry (σ, q, k). The node's ε
after any number of rounds is computed by feeding the *whole* history into a fresh
Opacus accountant (RDP or PRV), so the reported ε is always cumulative over the run —
never a per-round figure. The history outlives rounds and process restarts through a
JSON file (atomic write) in the node's state directory, and can also ride in Flower's
``context.state`` as a flat ConfigRecord-compatible dict.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.atomic_write import write_atomic

ACCOUNTANTS = ("rdp", "prv")
RECORD_KEYS = ("dp-history.noise-multiplier", "dp-history.sample-rate", "dp-history.steps")
FILE_VERSION = 1


@dataclass(frozen=True)
class AccountantEntry:
    """``num_steps`` DP-SGD steps, each with noise multiplier σ and Poisson sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    num_steps: int


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is not supported; use one of {', '.join(ACCOUNTANTS)}")


def planned_steps(num_rounds: int, participation: float, local_steps: int) -> int:
    """DP-SGD steps one client is expected to take over the run: ⌈rounds × participation × local steps⌉.

    ``participation`` is the probability that the client trains in a round (the
    strategy's ``fraction-train``). Rounding up errs on the side of more noise. A client
    that happens to be picked more often than expected is stopped by :func:`would_exceed`.
    """
    if num_rounds < 1 or local_steps < 1 or not 0 < participation <= 1:
        raise ValueError(
            f"planned_steps needs num_rounds >= 1, local_steps >= 1 and participation in (0, 1]; "
            f"got {num_rounds}, {local_steps}, {participation}"
        )
    return math.ceil(num_rounds * participation * local_steps - 1e-9)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest σ (Opacus binary search, ε tolerance 0.01) with ε(σ, q, steps; δ) ≤ target ε."""
    _check_accountant(accountant)
    if target_epsilon <= 0 or steps < 1 or not 0 < sample_rate <= 1:
        raise ValueError(
            f"calibrate_noise needs target_epsilon > 0, steps >= 1 and sample_rate in (0, 1]; "
            f"got {target_epsilon}, {steps}, {sample_rate}"
        )
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


def _merged(entries: Sequence[AccountantEntry]) -> list[tuple[float, float, int]]:
    """(σ, q, steps) tuples with neighbours of equal (σ, q) summed, as Opacus's own ``step()`` keeps them."""
    merged: list[tuple[float, float, int]] = []
    for e in entries:
        if merged and merged[-1][:2] == (e.noise_multiplier, e.sample_rate):
            merged[-1] = (e.noise_multiplier, e.sample_rate, merged[-1][2] + e.num_steps)
        else:
            merged.append((e.noise_multiplier, e.sample_rate, e.num_steps))
    return merged


@dataclass
class AccountantHistory:
    """All DP-SGD steps one node has taken in this run, oldest first."""

    entries: list[AccountantEntry] = field(default_factory=list)

    def add(self, entry: AccountantEntry) -> None:
        self.entries.append(entry)

    def extended(self, entry: AccountantEntry) -> AccountantHistory:
        """A copy of this history with ``entry`` appended (this one is left unchanged)."""
        return AccountantHistory([*self.entries, entry])

    @property
    def total_steps(self) -> int:
        return sum(e.num_steps for e in self.entries)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Cumulative ε at ``delta`` of every entry composed, from a fresh Opacus accountant.

        Entries with zero steps or a zero sampling rate release nothing and are left out;
        an entry with σ = 0 and steps > 0 makes ε infinite. An empty history has ε = 0.
        """
        _check_accountant(accountant)
        used = [e for e in self.entries if e.num_steps > 0 and e.sample_rate > 0]
        if not used:
            return 0.0
        if any(e.noise_multiplier <= 0 for e in used):
            return math.inf
        fresh = create_accountant(mechanism=accountant)
        fresh.history = _merged(used)
        return float(fresh.get_epsilon(delta=delta))

    def to_record(self) -> dict[str, list[float] | list[int]]:
        """Flat dict of three parallel lists, storable in a Flower ``ConfigRecord`` (``context.state``)."""
        sigma_key, rate_key, steps_key = RECORD_KEYS
        return {
            sigma_key: [float(e.noise_multiplier) for e in self.entries],
            rate_key: [float(e.sample_rate) for e in self.entries],
            steps_key: [int(e.num_steps) for e in self.entries],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> AccountantHistory:
        """Inverse of :meth:`to_record`; a record without the keys gives an empty history."""
        sigma_key, rate_key, steps_key = RECORD_KEYS
        if sigma_key not in record:
            return cls()
        sigmas, rates, steps = (list(record[k]) for k in RECORD_KEYS)  # type: ignore[call-overload]
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError(f"privacy history record is inconsistent: {len(sigmas)}, {len(rates)}, {len(steps)} entries")
        return cls([AccountantEntry(float(s), float(q), int(k)) for s, q, k in zip(sigmas, rates, steps)])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the history as JSON atomically (:func:`fedlora.atomic_write.write_atomic`)."""
        target = Path(path)
        payload = {"version": FILE_VERSION,
                   "entries": [[e.noise_multiplier, e.sample_rate, e.num_steps] for e in self.entries]}
        write_atomic(target, json.dumps(payload).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AccountantHistory:
        """Read a history written by :meth:`save`; a missing file is an empty history.

        An unreadable file is an error, never a silent reset: starting over would forget
        privacy already spent.
        """
        target = Path(path)
        if not target.exists():
            return cls()
        try:
            payload = json.loads(target.read_text())
            if payload.get("version") != FILE_VERSION:
                raise ValueError(f"unknown version {payload.get('version')!r}")
            return cls([AccountantEntry(float(s), float(q), int(k)) for s, q, k in payload["entries"]])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"privacy history file {target} is unreadable ({err}); refusing to reset the budget") from err


def epsilon_after(history: AccountantHistory, next_entry: AccountantEntry, delta: float, accountant: str = "rdp") -> float:
    """Cumulative ε the node would report after also taking ``next_entry``."""
    return history.extended(next_entry).epsilon(delta, accountant)


def would_exceed(history: AccountantHistory, next_entry: AccountantEntry, target_epsilon: float, delta: float,
                 accountant: str = "rdp") -> bool:
    """True when taking ``next_entry`` would push the cumulative ε past ``target_epsilon``.

    A client calls this before training and refuses the round when it is True, so the
    ε it ever reports stays ≤ target. Only meaningful with a budget (target ε > 0).
    """
    if target_epsilon <= 0:
        raise ValueError(f"would_exceed needs a budget target_epsilon > 0, got {target_epsilon}")
    return epsilon_after(history, next_entry, delta, accountant) > target_epsilon


def history_of(entries: Sequence[tuple[float, float, int]]) -> AccountantHistory:
    """A history from plain (σ, q, steps) tuples."""
    return AccountantHistory([AccountantEntry(float(s), float(q), int(k)) for s, q, k in entries])
