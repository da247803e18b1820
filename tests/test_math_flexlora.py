"""FlexLoRA against its equations in float64: the SVD of the averaged update, the truncations, their errors."""

import numpy as np
import pytest

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.client.role import cut_to_rank
from fedlora.server.mixed_ranks import at_scale_one
from fedlora.strategies.common import client_weights
from fedlora.strategies.flexlora.math import aggregate_flexlora, orthonormal_rows

M = "base_model.model.enc.query"
D, K, ALPHA = 14, 11, 8.0


def _states(ranks, seed=0):
    rng = np.random.default_rng(seed)
    return [{M + LORA_A: rng.standard_normal((r, K)), M + LORA_B: rng.standard_normal((D, r)),
             "base_model.model.head.weight": rng.standard_normal((3, D))} for r in ranks]


def _dense_average(states, p, scales):
    return sum(w * s * st[M + LORA_B] @ st[M + LORA_A] for w, s, st in zip(p, scales, states))


def _best(X, r):
    P, sigma, Qt = np.linalg.svd(X)
    return (P[:, :r] * sigma[:r]) @ Qt[:r], float(np.sum(sigma[r:] ** 2)), float(np.sum(sigma ** 2))


@pytest.mark.parametrize("ranks, R", [([2, 3, 4], 4), ([2, 2], 6)])
def test_global_adapter_is_the_best_rank_R_approximation_of_the_average(ranks, R):
    states, p = _states(ranks), client_weights([5, 9, 7][: len(ranks)], "num-examples")
    scales = [ALPHA / r for r in ranks]
    out, metrics = aggregate_flexlora(states, p, scales, ranks, R, ALPHA / R)
    X = _dense_average(states, p, scales)
    best, tail, total = _best(X, R)
    applied = (ALPHA / R) * out[M + LORA_B].astype(np.float64) @ out[M + LORA_A].astype(np.float64)
    np.testing.assert_allclose(applied, best, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[M + LORA_A] @ out[M + LORA_A].T, np.eye(R), atol=1e-5)
    assert metrics["agg_error"] == pytest.approx(np.sqrt(tail / total), abs=1e-7)
    client_tail = sum(w * _best(X, r)[1] for w, r in zip(p, ranks))
    assert metrics["client_truncation_error"] == pytest.approx(np.sqrt(client_tail / total), rel=1e-6)
    if R >= sum(ranks):
        assert metrics["agg_error"] < 1e-7, "nothing to truncate: exact"


@pytest.mark.parametrize("r", [1, 2, 3])
def test_each_client_receives_the_best_approximation_at_its_rank(r):
    ranks, R = [2, 3, 4], 4
    states, p = _states(ranks, seed=3), client_weights([4, 4, 8], "num-examples")
    scales = [ALPHA / rk for rk in ranks]
    global_state, _ = aggregate_flexlora(states, p, scales, ranks, R, ALPHA / R)
    client = cut_to_rank(at_scale_one(global_state, ALPHA / R, r), r, ALPHA / r)
    assert client[M + LORA_A].shape == (r, K) and client[M + LORA_B].shape == (D, r)
    held = (ALPHA / r) * client[M + LORA_B].astype(np.float64) @ client[M + LORA_A].astype(np.float64)
    np.testing.assert_allclose(held, _best(_dense_average(states, p, scales), r)[0], rtol=1e-4, atol=1e-4)


def test_missing_directions_are_completed_with_orthonormal_rows():
    Qt = np.linalg.qr(np.random.default_rng(0).standard_normal((K, 2)))[0].T
    rows = orthonormal_rows(Qt, 5)
    np.testing.assert_array_equal(rows[:2], Qt)
    np.testing.assert_allclose(rows @ rows.T, np.eye(5), atol=1e-12)
    with pytest.raises(ValueError, match="exceeds"):
        orthonormal_rows(Qt, K + 1)
