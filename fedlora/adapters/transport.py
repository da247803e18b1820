"""Adapter state <-> Flower ArrayRecord, and the exact bytes that travel.

Unpacking is zero-copy: every array of a received record becomes a read-only numpy view of
the record's own bytes (Flower's ``Array.numpy()`` copies through ``np.load``). The npy
header of each array is parsed and checked (dtype, shape, C order, no pickled objects)
before the view is made, so a malformed array is refused, never guessed at. Packing such a
view again (a client's factors that the server forwards in a weighted stack) reuses those bytes.

Everything travels as float32 except a weighted stack's coefficient vector
(:data:`fedlora.adapters.stack.COEFFICIENTS`), which is float64 so that no weight is rounded.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.adapters.stack import wire_dtype
from fedlora.adapters.state import AdapterState

NUMPY_STYPE = "numpy.ndarray"


def to_record(state: AdapterState) -> ArrayRecord:
    """Pack arrays (in key order) into an ArrayRecord, each in its :func:`~fedlora.adapters.stack.wire_dtype`
    (:func:`npy_array`). Each Array is stored as made (``ArrayRecord(dict)`` would build every Array a
    second time: twice the per-array cost, which dominates a weighted stack of ~200 views)."""
    record = ArrayRecord()
    for key, value in state.items():
        record[key] = npy_array(value, wire_dtype(key))
    return record


def npy_array(value: np.ndarray, dtype: type = np.float32) -> Array:
    """A Flower Array of ``dtype`` holding exactly what ``np.save`` writes (npy 1.0), with at most one copy.

    A view of a received npy payload (:func:`array_view`) of that dtype is packed as the bytes it
    views, without a copy (:func:`received_payload`). Otherwise the cached header and the array's
    buffer are joined once (Flower's ``Array(ndarray)`` goes through ``np.save`` into a growing
    BytesIO and copies the result again: ~8× slower for a 2.6 MB stack).
    """
    array = np.ascontiguousarray(value, dtype=dtype)
    header = npy_header_bytes(array.shape, array.dtype.str)
    data = received_payload(array, header)
    if data is None:
        data = b"".join((header, array.data))
    return Array(dtype=dtype_name(array.dtype), shape=tuple(array.shape), stype=NUMPY_STYPE, data=data)


@functools.cache
def dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)`` (what Flower's Array records), cached: numpy computes it in Python on every call."""
    return str(dtype)


def received_payload(array: np.ndarray, header: bytes) -> bytes | None:
    """The ``bytes`` that ``array`` views when they are exactly ``header`` followed by the array's values, else None."""
    owner = array.base
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if not isinstance(owner, bytes) or len(owner) != len(header) + array.nbytes or not owner.startswith(header):
        return None
    start = np.frombuffer(owner, dtype=np.uint8, count=0, offset=len(header)).__array_interface__["data"][0]
    return owner if array.__array_interface__["data"][0] == start else None


@functools.lru_cache(maxsize=4096)
def npy_header_bytes(shape: tuple[int, ...], descr: str) -> bytes:
    """The npy 1.0 header ``np.save`` writes for a C-order array of ``shape`` and dtype ``descr``."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


#: the npy magic string, then the format version (major, minor)
NPY_MAGIC = b"\x93NUMPY"


def array_view(array: Array) -> np.ndarray:
    """A read-only view of an Array's payload (no copy); ``ValueError`` for anything but a plain C-order npy array."""
    if array.stype != NUMPY_STYPE:
        raise ValueError(f"array of serialization type {array.stype!r}, expected {NUMPY_STYPE!r}")
    data = array.data
    if data[:6] != NPY_MAGIC or len(data) < 12:
        raise ValueError("array payload is not in npy format")
    length_bytes = {1: 2, 2: 4}.get(data[6])
    if length_bytes is None or data[7] != 0:
        raise ValueError(f"array in npy format version {data[6]}.{data[7]}, expected 1.0 or 2.0")
    offset = 8 + length_bytes + int.from_bytes(data[8:8 + length_bytes], "little")
    shape, dtype = npy_header(bytes(data[:offset]))
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"array payload of {len(data) - offset} bytes for shape {shape} and dtype {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=4096)
def npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an npy header (magic to the end of the header dict), parsed and checked by numpy's own
    reader; ``ValueError`` for Fortran order or object dtypes. Cached: a round's replies repeat a few headers."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if fortran or dtype.hasobject:
        raise ValueError(f"array with {'Fortran order' if fortran else 'object dtype'}: not a plain numpy array")
    return tuple(shape), dtype


def from_record(record: ArrayRecord) -> AdapterState:
    """Unpack an ArrayRecord into read-only numpy views of its bytes (see the module docstring)."""
    return {k: array_view(v) for k, v in record.items()}


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
