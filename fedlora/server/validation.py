"""Validate one client's reply against what its strategy expects, before any aggregation.

Pure functions over numpy arrays; :meth:`fedlora.server.rounds.RoundLoop.collect`
calls them for every reply and leaves rejected replies out of the round. A reply is
accepted only if

* ``num-examples`` is an integer > 0;
* it carries exactly the expected tensors (no missing, no unexpected names);
* every tensor is float32 with the expected shape (the strategy states the shapes, e.g.
  from the client's announced rank for FLoRA);
* every value is finite (no NaN or ±Inf);
* every tensor's root-mean-square ``sqrt(mean(x²))`` is at most ``validation.max-rms``.

Both value checks are one float32 pass over each tensor, block by block, which also measures
the upload's distance to the state it started from, for the norm bound
(:mod:`fedlora.server.influence`). With a same-shaped reference R the pass forms Δ = x − R and
its dot product with itself: a NaN, an Inf or an overflow in x makes it non-finite, and the
triangle inequality ‖x‖ ≤ ‖R‖ + ‖Δ‖ (‖R‖ computed once per round, :class:`Reference`) settles
the RMS bound for every tensor well inside it. Only a tensor that this cannot clear — within
0.1 % of the bound, or non-finite — is read again for its own squares (‖x‖², exactly as
without a reference), and only one that fails once more, to name the problem.

The RMS bound is per tensor and per element, so one threshold fits every model size:
LoRA's A starts at RMS 1/√(3k) < 1, B and R near the initial values the server sent, and
trained adapters stay far below 1 at usual learning rates; an RMS of 10 (the default)
means every entry is ~10 on average — an exploded or malicious update, not training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Shapes = dict[str, tuple[int, ...]]


class InvalidUpdate(ValueError):
    """A client reply that must not enter aggregation; the message is the reason."""


def num_examples_of(metrics: Mapping[str, object]) -> int:
    """The reply's ``num-examples`` as an integer > 0, else :class:`InvalidUpdate`."""
    value = metrics.get("num-examples")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InvalidUpdate(f"num-examples = {value!r} is not an integer")
    if value <= 0:
        raise InvalidUpdate(f"num-examples = {int(value)} is not > 0")
    return int(value)


#: elements per block of :func:`validate_upload` (256 KiB of float32): a block and its difference stay in the L2 cache,
#: and a q_proj-sized LoRA factor (4096 × 16) is one block
BLOCK = 1 << 16
#: the triangle inequality clears a tensor's RMS bound only below this fraction of it (the rounding of float32 dot
#: products of these sizes is far below 0.1 %); a tensor nearer the bound has its own squares summed
CLEARED = 0.999


class Reference:
    """The state the clients of a round started from, with each tensor's ‖R‖² summed once, when first asked for."""

    def __init__(self, arrays: Mapping[str, np.ndarray] | None = None) -> None:
        self.arrays: Mapping[str, np.ndarray] = arrays or {}
        self._norms2: dict[str, float] = {}

    def flat(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Tensor ``key`` flattened, as float32, if it has ``shape``; else None (the upload counts against zero)."""
        array = self.arrays.get(key)
        if array is None or np.shape(array) != shape:
            return None
        return np.asarray(array, dtype=np.float32).reshape(-1)

    def norm2(self, key: str, flat: np.ndarray) -> float:
        """‖R‖² of tensor ``key`` (``flat``: what :meth:`flat` returned for it)."""
        if key not in self._norms2:
            self._norms2[key] = squares(flat)
        return self._norms2[key]


def squares(flat: np.ndarray) -> float:
    """Σ x² of a flat float32 array, block by block (a NaN, an Inf or an overflow make it non-finite)."""
    return float(sum(float(np.dot(block, block)) for block in (flat[i:i + BLOCK] for i in range(0, flat.size, BLOCK))))


def validate_upload(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], max_rms: float,
                    reference: Reference | Mapping[str, np.ndarray] | None = None,
                    observe: Callable[[str, np.ndarray], None] | None = None) -> float:
    """Raise :class:`InvalidUpdate` naming the first problem of ``state`` (see the module docstring); else return
    ‖state − reference‖² over every tensor (a tensor without a same-shaped reference counts against zero).

    The distance is what the norm bound of :mod:`fedlora.server.influence` needs; it comes from the
    same pass that checks the values, block by block: each block's difference to the reference in a
    reused float32 buffer and its squares, while the block is still in the cache (without a reference,
    the block's own squares). Pass a :class:`Reference` to sum each reference tensor's squares once
    for all the uploads checked against it.
    ``observe(key, tensor)`` is called for every tensor that passed, right after its pass, while it is
    still in the cache (a strategy's products of each upload, e.g. HetLoRA's factor Grams, read it there
    instead of from memory once more).
    """
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InvalidUpdate(f"missing tensor(s) {missing[:3]}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InvalidUpdate(f"unexpected tensor(s) {unexpected[:3]}")
    reference = reference if isinstance(reference, Reference) else Reference(reference)
    buffer = np.empty(BLOCK, dtype=np.float32)
    distance = 0.0
    for key in sorted(expected):
        array = state[key]
        if array.dtype != np.float32:
            raise InvalidUpdate(f"tensor {key!r} has dtype {array.dtype}, expected float32")
        if tuple(array.shape) != tuple(expected[key]):
            raise InvalidUpdate(f"tensor {key!r} has shape {tuple(array.shape)}, expected {tuple(expected[key])}")
        flat = array.reshape(-1)
        ref_flat = reference.flat(key, array.shape)
        limit2 = max_rms**2 * flat.size
        if ref_flat is None:
            differences = own = squares(flat)
        else:
            differences = 0.0
            for start in range(0, flat.size, BLOCK):
                block = flat[start:start + BLOCK]
                delta = np.subtract(block, ref_flat[start:start + BLOCK], out=buffer[: block.size])
                differences += float(np.dot(delta, delta))
            bound = (np.sqrt(reference.norm2(key, ref_flat)) + np.sqrt(differences)) ** 2  # ≥ ‖x‖²: triangle inequality
            own = bound if np.isfinite(bound) and bound <= CLEARED * limit2 else squares(flat)
        if not np.isfinite(own):
            bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
            if bad:
                raise InvalidUpdate(f"tensor {key!r} has {bad} non-finite value(s) (NaN/Inf)")
        if own > limit2:
            rms = float(np.sqrt(own / flat.size))
            raise InvalidUpdate(f"tensor {key!r} has root-mean-square {rms:.3g} > validation.max-rms = {max_rms:g}")
        if observe is not None:
            observe(key, array)
        distance += differences
    return distance


def announced_rank(metrics: Mapping[str, float], allowed: set[int]) -> int:
    """The LoRA rank a reply announces (metric ``rank``), if it is one of the configured ranks; else :class:`InvalidUpdate`."""
    rank = metrics.get("rank")
    if rank is None or not float(rank).is_integer() or int(rank) not in allowed:
        raise InvalidUpdate(f"announced rank {rank!r} is not one of the configured ranks {sorted(allowed)}")
    return int(rank)
