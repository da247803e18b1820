"""Shape arithmetic for the strategies' byte contracts (``traffic`` in each strategy's math module)."""

from __future__ import annotations

import math

import numpy as np

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.stack import wire_dtype

Shapes = dict[str, tuple[int, ...]]


def in_record(record: str, shapes: Shapes) -> Shapes:
    """``shapes`` as arrays of record ``record`` (names ``<record>/<name>``)."""
    return {f"{record}/{k}": v for k, v in shapes.items()}


def array_name(key: str) -> str:
    """The array's own name in a contract key (without its ``<record>/``)."""
    return key.rpartition("/")[2]


def payload_bytes(key: str, shape: tuple[int, ...]) -> int:
    """Bytes of the values of the array ``key`` of ``shape`` as it travels (its :func:`~fedlora.adapters.stack.wire_dtype`)."""
    return np.dtype(wire_dtype(array_name(key))).itemsize * math.prod(shape)


def lora_dims(adapter: Shapes) -> dict[str, tuple[int, int, int]]:
    """Module prefix -> (d, k, r) of every LoRA pair in an adapter's shapes."""
    return {key[: -len(LORA_A)]: (adapter[key[: -len(LORA_A)] + LORA_B][0], shape[1], shape[0])
            for key, shape in adapter.items() if key.endswith(LORA_A)}


def extras(adapter: Shapes) -> Shapes:
    """The shapes of every tensor that is not a LoRA factor (a classification head)."""
    return {k: v for k, v in adapter.items() if not k.endswith((LORA_A, LORA_B))}


def at_rank(adapter: Shapes, rank: int) -> Shapes:
    """Every LoRA pair of ``adapter`` at ``rank`` (A rank×k, B d×rank); extras unchanged."""
    out = dict(extras(adapter))
    for m, (d, k, _) in lora_dims(adapter).items():
        out[m + LORA_A], out[m + LORA_B] = (rank, k), (d, rank)
    return out
