"""Simulated client faults for reliability studies: dropouts, stragglers and corrupted replies.

Every sampled client decides for itself, from an RNG seeded by (seed, round, partition)
alone, whether it fails this training round, so a study is reproducible under the seed
and the server meets the faults exactly as it meets real ones:

* **dropout** (``faults.dropout``): the ClientApp raises before training; Flower turns
  that into an error reply (a real crash or a vanished node ends the same way, or not at all).
* **straggler** (``faults.straggler``): the client trains, then reports a simulated delay
  of ``round-timeout`` seconds (reply metric ``simulated-delay``); the server treats the
  reply as having arrived after the deadline and discards it. Nothing sleeps.
* **corrupt** (``faults.corrupt``): the client trains, then breaks its upload in one of
  the ways :data:`CORRUPTIONS` lists; the server's validation must reject it.

The three are drawn from independent uniforms and checked in that order (a dropped
client cannot also straggle). Only training rounds (server round ≥ 1) are affected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.config import FaultsConfig
from fedlora.protocol import SIMULATED_DELAY
from fedlora.adapters.state import AdapterState

DROPOUT = "dropout"
STRAGGLER = "straggler"
CORRUPT = "corrupt"
#: how a corrupted upload is broken (applied to the alphabetically first tensor)
CORRUPTIONS = ("nan", "inf", "shape", "missing")
#: first entry of the fault RNG's seed, so its draws never coincide with another seeded stream
FAULT_STREAM = 0xFA17


class InjectedDropout(RuntimeError):
    """The simulated failure of a client that drops out of a round."""


@dataclass(frozen=True)
class Fault:
    """What happens to one client in one round: ``kind`` is None, dropout, straggler or corrupt."""

    kind: str | None = None
    corruption: str | None = None

    def check_alive(self, server_round: int, partition_id: int) -> None:
        """Raise :class:`InjectedDropout` if this client drops out of the round."""
        if self.kind == DROPOUT:
            raise InjectedDropout(f"injected dropout (faults.dropout): partition {partition_id} fails round {server_round}")

    def reply_metrics(self, round_timeout: float) -> dict[str, float]:
        """A straggler's reply reports a delay of ``round_timeout`` seconds: it lands past the deadline."""
        return {SIMULATED_DELAY: float(round_timeout)} if self.kind == STRAGGLER else {}

    def apply(self, upload: AdapterState) -> AdapterState:
        """The upload as this client sends it: unchanged, or broken as ``corruption`` says."""
        if self.kind != CORRUPT or not upload:
            return upload
        key = sorted(upload)[0]
        broken = dict(upload)
        if self.corruption == "missing":
            del broken[key]
            return broken
        array = np.array(upload[key], dtype=np.float32)
        if self.corruption == "shape":
            broken[key] = array[:-1]  # one row short
        else:
            array.reshape(-1)[0] = np.nan if self.corruption == "nan" else np.inf
            broken[key] = array
        return broken


def draw_fault(faults: FaultsConfig, seed: int, server_round: int, partition_id: int) -> Fault:
    """This client's fault in this round, from an RNG of (seed, round, partition) only."""
    if server_round < 1:
        return Fault()
    rng = np.random.default_rng((FAULT_STREAM, seed, server_round, partition_id + 1))
    u_dropout, u_straggler, u_corrupt, u_pick = rng.random(4)
    if u_dropout < faults.dropout:
        return Fault(DROPOUT)
    if u_straggler < faults.straggler:
        return Fault(STRAGGLER)
    if u_corrupt < faults.corrupt:
        return Fault(CORRUPT, CORRUPTIONS[int(u_pick * len(CORRUPTIONS))])
    return Fault()
