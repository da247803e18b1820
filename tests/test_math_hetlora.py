"""HetLoRA against its equations in float64: zero-padding, sparsity weights, the padded average, truncation."""

import numpy as np
import pytest

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.client.role import cut_to_rank
from fedlora.server.mixed_ranks import at_scale_one
from fedlora.strategies.common import client_weights
from fedlora.strategies.error_norms import factor_gram
from fedlora.strategies.hetlora.math import aggregate_hetlora, padded_average, sparsity_weights

M = "base_model.model.enc.query"
D, K, ALPHA, R = 12, 9, 16.0, 4


def _states(ranks, seed=0):
    rng = np.random.default_rng(seed)
    return [{M + LORA_A: rng.standard_normal((r, K)), M + LORA_B: rng.standard_normal((D, r)),
             "base_model.model.head.weight": rng.standard_normal((3, D))} for r in ranks]


def zero_pad(B, A, rank, scale, global_scale):
    """HetLoRA's padding, by its definition: B' = [(s_k/s_R)·B, 0], A' = [A; 0] of rank ``rank``."""
    B_pad, A_pad = np.zeros((B.shape[0], rank)), np.zeros((rank, A.shape[1]))
    B_pad[:, : A.shape[0]], A_pad[: A.shape[0]] = (scale / global_scale) * B, A
    return B_pad, A_pad


def test_zero_padding_keeps_the_client_update():
    rng = np.random.default_rng(1)
    B, A = rng.standard_normal((D, 2)), rng.standard_normal((2, K))
    B_pad, A_pad = padded_average([B], [A], np.array([1.0]), [ALPHA / 2], R, ALPHA / R)
    assert B_pad.shape == (D, R) and A_pad.shape == (R, K) and not A_pad[2:].any() and not B_pad[:, 2:].any()
    np.testing.assert_allclose((ALPHA / R) * B_pad @ A_pad, (ALPHA / 2) * B @ A, rtol=1e-12)
    with pytest.raises(ValueError, match="global rank"):
        padded_average([rng.standard_normal((D, 5))], [rng.standard_normal((5, K))], np.array([1.0]), [1.0], R, 1.0)


def test_clients_at_the_global_rank_are_averaged_as_their_padded_updates():
    states, w = _states([R, R, R], seed=3), np.array([0.2, 0.3, 0.5])
    Bs, As, scales = [s[M + LORA_B] for s in states], [s[M + LORA_A] for s in states], [1.0, 2.0, 3.0]
    B_bar, A_bar = padded_average(Bs, As, w, scales, R, ALPHA / R)
    padded = [zero_pad(B, A, R, s, ALPHA / R) for B, A, s in zip(Bs, As, scales)]
    np.testing.assert_allclose(B_bar, sum(wk * b for wk, (b, _) in zip(w, padded)), rtol=1e-14)
    np.testing.assert_allclose(A_bar, sum(wk * a for wk, (_, a) in zip(w, padded)), rtol=1e-14)


def test_sparsity_weights_follow_the_update_norms():
    rng = np.random.default_rng(2)
    Bs = [rng.standard_normal((D, 2)), 3 * rng.standard_normal((D, 4))]
    As = [rng.standard_normal((2, K)), rng.standard_normal((4, K))]
    p, scales = np.array([0.25, 0.75]), [ALPHA / 2, ALPHA / 4]
    norms = np.array([s * np.linalg.norm(B @ A) for B, A, s in zip(Bs, As, scales)])
    np.testing.assert_allclose(sparsity_weights(Bs, As, scales, p), p * norms / (p * norms).sum(), rtol=1e-12)
    zeros = [np.zeros_like(B) for B in Bs]
    np.testing.assert_array_equal(sparsity_weights(zeros, As, scales, p), p)


def test_sparsity_weights_take_the_grams_they_are_given_and_make_the_missing_ones():
    rng = np.random.default_rng(6)
    Bs = [rng.standard_normal((D, 3)).astype(np.float32) for _ in range(3)]
    As = [rng.standard_normal((3, K)).astype(np.float32) for _ in range(3)]
    p, scales = np.array([0.2, 0.3, 0.5]), [ALPHA / 3] * 3
    grams = [(factor_gram(B, "left"), factor_gram(A, "right")) for B, A in zip(Bs, As)]
    made = sparsity_weights(Bs, As, scales, p)
    np.testing.assert_array_equal(sparsity_weights(Bs, As, scales, p, grams), made)
    np.testing.assert_array_equal(sparsity_weights(Bs, As, scales, p, [(None, None), grams[1], (grams[2][0], None)]), made)
    doubled = [(4 * grams[0][0], grams[0][1]), *grams[1:]]  # as if B_0 were twice as large: its norm doubles
    raw = made * np.array([2.0, 1.0, 1.0])
    np.testing.assert_allclose(sparsity_weights(Bs, As, scales, p, doubled), raw / raw.sum(), rtol=1e-6)


def test_the_global_adapter_is_the_sparsity_weighted_average_of_the_padded_updates():
    ranks = [2, 3, 4]
    states, p = _states(ranks), client_weights([3, 5, 8], "num-examples")
    scales = [ALPHA / r for r in ranks]
    out, metrics = aggregate_hetlora(states, p, scales, R, ALPHA / R)
    Bs, As = [s[M + LORA_B] for s in states], [s[M + LORA_A] for s in states]
    w = sparsity_weights(Bs, As, scales, p)
    padded = [zero_pad(B, A, R, s, ALPHA / R) for B, A, s in zip(Bs, As, scales)]
    B_bar, A_bar = sum(wk * b for wk, (b, _) in zip(w, padded)), sum(wk * a for wk, (_, a) in zip(w, padded))
    np.testing.assert_allclose(out[M + LORA_B], B_bar, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[M + LORA_A], A_bar, rtol=1e-5, atol=1e-6)
    ideal = sum(pk * s * B @ A for pk, s, B, A in zip(p, scales, Bs, As))
    applied = (ALPHA / R) * out[M + LORA_B].astype(np.float64) @ out[M + LORA_A].astype(np.float64)
    assert metrics["agg_error"] == pytest.approx(np.linalg.norm(applied - ideal) / np.linalg.norm(ideal), rel=1e-6)
    assert metrics["agg_error"] > 1e-2, "approximate once clients differ"
    np.testing.assert_allclose(out["base_model.model.head.weight"], sum(pk * s["base_model.model.head.weight"]
                                                                        for pk, s in zip(p, states)), rtol=1e-5)


def test_one_client_of_a_lower_rank_is_aggregated_exactly():
    states = _states([2], seed=4)
    _, metrics = aggregate_hetlora(states, np.array([1.0]), [ALPHA / 2], R, ALPHA / R)
    assert metrics["agg_error"] < 1e-6


def test_a_client_receives_the_first_components_of_the_global_adapter():
    states, p = _states([4, 4], seed=5), np.array([0.5, 0.5])
    global_state, _ = aggregate_hetlora(states, p, [ALPHA / R] * 2, R, ALPHA / R)
    client = cut_to_rank(at_scale_one(global_state, ALPHA / R, 2), 2, ALPHA / 2)
    held = (ALPHA / 2) * client[M + LORA_B].astype(np.float64) @ client[M + LORA_A].astype(np.float64)
    first = (ALPHA / R) * global_state[M + LORA_B][:, :2].astype(np.float64) @ global_state[M + LORA_A][:2].astype(np.float64)
    np.testing.assert_allclose(held, first, rtol=1e-5, atol=1e-5)
