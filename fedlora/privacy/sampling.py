"""Seeded randomness for DP-SGD: Poisson-sampled batches and the Gaussian noise generator.

Poisson sampling includes every one of the client's n rows in a batch independently with
probability q, so batch sizes vary (and may be 0); this is the sampling that the
subsampled-Gaussian accountants assume.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def sample_rate_of(batch_size: int, num_rows: int) -> float:
    """Poisson sampling rate q = min(1, batch size / n) over the client's whole local dataset."""
    if num_rows < 1:
        raise ValueError("cannot sample batches from an empty partition")
    return min(1.0, batch_size / num_rows)


def poisson_batches(num_rows: int, sample_rate: float, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless Poisson batches: row i is in a batch when U_i < q, U_i ~ U(0, 1) drawn from ``generator``."""
    while True:
        keep = torch.rand(num_rows, generator=generator) < sample_rate
        yield keep.nonzero().flatten().tolist()


def noise_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for the Gaussian noise, seeded by one 63-bit draw from ``generator``."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
