"""A differentially private full-weight gradient estimate (Fed-SB's initialisation under sample-level DP).

Fed-SB's clients upload a dense gradient estimate G_m = ∂L/∂W_m of every target weight
once, before training, and B, A come from its SVD. Under ``dp.mode = "sample"`` that upload
is a release of the client's data like any DP-SGD step, so it is computed by the same
subsampled Gaussian mechanism and accounted in the node's history. Over N Poisson batches
S_b (each row kept with probability q):

    G = (1/N) Σ_b ( Σ_{i∈S_b} g_i · min(1, C / (‖g_i‖ + 1e-6)) + N(0, σ²C² I) ) / (q·n),

with g_i the per-example gradient of every target weight jointly (one L2 norm over all
of them, as Opacus's flat clipping) and q·n the expected batch size. It is N steps of
rate q and noise σ for the accountant. Per-example gradients are taken one example at a
time, which is exact and needs no hooks on the frozen base weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedlora.adapters.lorasb import weights_requiring_grad
from fedlora.privacy.sampling import noise_generator, poisson_batches

#: Opacus's clipping stabiliser, so this estimate clips exactly as the DP-SGD steps do
CLIP_EPS = 1e-6


def dp_gradient_estimate(model: nn.Module, num_rows: int, target_names: Sequence[str],
                         example_loss: Callable[[nn.Module, int], torch.Tensor], num_batches: int, sample_rate: float,
                         noise_multiplier: float, max_norm: float, generator: torch.Generator) -> dict[str, np.ndarray]:
    """G above (float32 numpy per target module); ``example_loss(model, i)`` is row i's scalar loss.

    Randomness from ``generator``: one draw seeds the noise, then one Poisson mask per batch.
    """
    if num_batches < 1 or not 0 < sample_rate <= 1 or max_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"dp_gradient_estimate needs num_batches >= 1, sample_rate in (0, 1], max_norm > 0 and "
                         f"noise_multiplier >= 0; got {num_batches}, {sample_rate}, {max_norm}, {noise_multiplier}")
    batches = poisson_batches(num_rows, sample_rate, generator)
    with weights_requiring_grad(model, target_names) as weights:
        params = list(weights.values())
        noise = noise_generator(generator, params[0].device)
        sums = [torch.zeros(w.shape, dtype=torch.float64, device=w.device) for w in params]
        for _ in range(num_batches):
            for i in next(batches):
                grads = torch.autograd.grad(example_loss(model, i), params)
                norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
                factor = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
                for acc, g in zip(sums, grads):
                    acc += factor * g.double()
            for acc in sums:
                acc += noise_multiplier * max_norm * torch.normal(0.0, 1.0, acc.shape, generator=noise, device=acc.device,
                                                                   dtype=torch.float32).double()
    scale = 1.0 / (num_batches * sample_rate * num_rows)
    return {name: (acc * scale).to("cpu", torch.float32).numpy() for name, acc in zip(weights, sums)}
