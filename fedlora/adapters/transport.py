"""Adapter state <-> Flower ArrayRecord, and the exact bytes that travel."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.adapters.state import AdapterState


def to_record(state: AdapterState) -> ArrayRecord:
    """Pack float32 arrays (in key order) into an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> AdapterState:
    """Unpack an ArrayRecord into numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of a record's arrays as Flower counts it (array payloads + keys)."""
    return record.count_bytes()


def digest(state: AdapterState) -> str:
    """A short fingerprint of tensors (keys and float32 bytes), to check that frozen factors agree."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(np.ascontiguousarray(state[key], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
