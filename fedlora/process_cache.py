"""What a process keeps between messages — models, datasets, tokenizers — and the one way to drop all of it.

Everything fedlora caches per process is made with :func:`process_cache` (a bounded
``functools.lru_cache``) or registers its own clear function with :func:`on_clear`, so a
long-lived process (a site's persistent runner, which serves run after run) can evict every
resident model of one run before the next run with another model or config
(:func:`clear_process_caches`), keeping memory bounded to one run's models.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
_CLEARS: list[Callable[[], None]] = []


def process_cache(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` whose entries :func:`clear_process_caches` drops."""
    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _CLEARS.append(cached.cache_clear)
        return cached  # type: ignore[return-value]

    return wrap


def on_clear(clear: Callable[[], None]) -> None:
    """Register ``clear`` (e.g. a cache dict's ``clear``) to run in :func:`clear_process_caches`."""
    _CLEARS.append(clear)


def clear_process_caches() -> None:
    """Drop every cached model, dataset and tokenizer of this process and return the memory (GPU included)."""
    for clear in _CLEARS:
        clear()
    gc.collect()
    import torch  # only a process that cached models has it loaded already; importing it here costs nothing then

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
