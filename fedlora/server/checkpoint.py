"""The server checkpoint written after every round, and resuming a run from it.

One file, ``<run-dir>/checkpoint.safetensors``: the strategy's arrays (global adapter and
whatever else :meth:`~fedlora.server.rounds.RoundLoop.checkpoint_state` returns) as
safetensors tensors, and in the safetensors header one JSON document with the round it
completed, the resolved run config, the strategy's JSON values (sampling RNG state, FLoRA's
merge list, a DP accountant's history …) and a SHA-256 over every array. No pickle.

Writes are atomic: a temporary file in the same directory, ``fsync``, ``os.replace``, then
``fsync`` of the directory, so a crash at any moment leaves either the previous complete
checkpoint or the new one. Reading checks the file parses and the checksum matches;
anything else is a :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedlora.atomic_write import write_atomic
from fedlora.config import ConfigError, RunConfig
from fedlora.adapters.state import AdapterState

CHECKPOINT_FILE = "checkpoint.safetensors"
#: 2: merge logs keep per-round merges and the factors of dense ones (`merge-factors-<j>/`), no running total
FORMAT = 2
HEADER_KEY = "fedlora-checkpoint"
#: run-config keys a resumed run may change; every other key must equal the checkpoint's
RESUMABLE_CHANGES = frozenset({"num-server-rounds", "resume-from", "output-dir", "round-timeout", "device"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit the run resuming from it."""


@dataclass
class Checkpoint:
    """What the server needs to continue after round ``server_round``."""

    server_round: int
    config: dict[str, Any]
    arrays: AdapterState
    values: dict[str, Any]


def checksum(arrays: AdapterState) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{array.dtype.str}|{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Atomically replace ``path`` with ``checkpoint`` (temporary file, fsync, os.replace, fsync of the folder)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in checkpoint.arrays.items()}
    header = {"format": FORMAT, "round": checkpoint.server_round, "config": checkpoint.config,
              "values": checkpoint.values, "sha256": checksum(arrays)}
    payload = save(arrays, metadata={HEADER_KEY: json.dumps(header)})
    write_atomic(path, payload)


def _header(raw: bytes, path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors payload (its metadata lives in the first 8 + n bytes)."""
    size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8:8 + size]).get("__metadata__") or {}
    if HEADER_KEY not in metadata:
        raise CheckpointError(f"checkpoint {path} is not a fedlora checkpoint (no {HEADER_KEY!r} header)")
    return json.loads(metadata[HEADER_KEY])


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and verify ``path``; :class:`CheckpointError` names the file when it is missing, truncated or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run never completed a round, or this is not a run directory")
    raw = path.read_bytes()
    try:
        arrays = load(raw)
        header = _header(raw, path)
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err}); it cannot be resumed from") from err
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {header.get('format')!r}; this fedlora reads format {FORMAT}")
    if checksum(arrays) != header["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do not match the checksum written with them")
    return Checkpoint(int(header["round"]), header["config"], arrays, header["values"])


def check_resumable(checkpoint: Checkpoint, cfg: RunConfig, path: Path) -> None:
    """Refuse to resume ``checkpoint`` under a config that changes the run's math or ends before it."""
    current = cfg.to_flat()
    changed = sorted(k for k in set(current) | set(checkpoint.config)
                     if k not in RESUMABLE_CHANGES and current.get(k) != checkpoint.config.get(k))
    if changed:
        details = ", ".join(f"{k!r}: {checkpoint.config.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"config key(s) differ from the checkpoint {path} being resumed: {details}; "
                          f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")
    if cfg.num_server_rounds < checkpoint.server_round:
        raise ConfigError(f"config key 'num-server-rounds' = {cfg.num_server_rounds} is invalid: the checkpoint {path} "
                          f"is already at round {checkpoint.server_round}")
