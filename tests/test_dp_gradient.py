"""Fed-SB's private gradient estimate: exact clipped sums, calibrated noise, flags restored."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedlora.privacy.dp_gradient import CLIP_EPS, dp_gradient_estimate
from fedlora.privacy.sampling import noise_generator, poisson_batches

N_ROWS, Q, BATCHES = 12, 0.5, 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 2)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


X = torch.randn(N_ROWS, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 2, (N_ROWS,), generator=torch.Generator().manual_seed(2))


def example_loss(model: nn.Module, i: int) -> torch.Tensor:
    return nn.functional.cross_entropy(model(X[i : i + 1]), Y[i : i + 1])


def estimate(model: nn.Module, sigma: float, max_norm: float, seed: int = 3) -> dict[str, np.ndarray]:
    return dp_gradient_estimate(model, N_ROWS, ["up", "down"], example_loss, BATCHES, Q, sigma, max_norm,
                                torch.Generator().manual_seed(seed))


def reference(max_norm: float, seed: int = 3) -> dict[str, np.ndarray]:
    """Hand-written: the same Poisson batches, per-example gradients in fp64, joint clip, sum / (N q n)."""
    model = Net().double()
    generator = torch.Generator().manual_seed(seed)
    noise_generator(generator, torch.device("cpu"))  # the estimate draws its noise seed first
    batches = poisson_batches(N_ROWS, Q, generator)
    weights = [model.up.weight, model.down.weight]
    total = [torch.zeros_like(w) for w in weights]
    for _ in range(BATCHES):
        for i in next(batches):
            for w in weights:
                w.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(X[i : i + 1].double()), Y[i : i + 1])
            grads = torch.autograd.grad(loss, weights)
            norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
            for t, g in zip(total, grads):
                t += g * min(1.0, max_norm / (norm + CLIP_EPS))
    return {name: (t / (BATCHES * Q * N_ROWS)).numpy() for name, t in zip(["up", "down"], total)}


@pytest.mark.parametrize("max_norm", [1e-2, 1e3])
def test_without_noise_it_is_the_clipped_per_example_sum_over_the_expected_batch(max_norm):
    got, want = estimate(Net(), 0.0, max_norm), reference(max_norm)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_noise_has_the_calibrated_scale_and_flags_are_restored():
    model = Net()
    sigma, max_norm = 2.0, 0.5
    noisy, clean = estimate(model, sigma, max_norm), estimate(model, 0.0, max_norm)
    residual = np.concatenate([(noisy[k] - clean[k]).ravel() for k in noisy])
    expected_std = sigma * max_norm * math.sqrt(BATCHES) / (BATCHES * Q * N_ROWS)
    assert np.std(residual) == pytest.approx(expected_std, rel=0.35)  # 36 coordinates
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sample_rate in \\(0, 1\\].*got 3, 0.0"):
        dp_gradient_estimate(Net(), N_ROWS, ["up"], example_loss, 3, 0.0, 1.0, 1.0, torch.Generator())
