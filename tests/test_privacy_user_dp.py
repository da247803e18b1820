"""User-level DP at the server (fedlora.privacy.user_dp)."""

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedlora.privacy.user_dp import check_user_dp_strategy, clip_update, noisy_average, update_norm, user_level_epsilon


def update(seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": (scale * rng.normal(size=(4, 6))).astype(np.float32),
            "a.lora_B.weight": (scale * rng.normal(size=(5, 4))).astype(np.float32)}


def test_clip_scales_the_whole_update_jointly():
    big = update(0, 3.0)
    clipped = clip_update(big, 1.0)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    factor = clipped["a.lora_A.weight"] / big["a.lora_A.weight"]
    assert np.allclose(factor, factor.flat[0]) and np.allclose(clipped["a.lora_B.weight"], factor.flat[0] * big["a.lora_B.weight"])
    small = update(1, 0.01)
    assert all(np.array_equal(clip_update(small, 1.0)[k], small[k]) for k in small)
    assert clipped["a.lora_A.weight"].dtype == np.float32


def test_noise_free_average_is_the_plain_unweighted_mean_of_clipped_updates():
    deltas = [update(0, 3.0), update(1, 0.01), update(2, 0.5)]
    got = noisy_average(deltas, 1.0, 0.0, np.random.default_rng(0))
    for key in deltas[0]:
        want = np.mean([clip_update(d, 1.0)[key] for d in deltas], axis=0)
        assert np.allclose(got[key], want, rtol=1e-6, atol=1e-7)


def test_noise_std_is_sigma_c_over_m():
    deltas = [{"w": np.zeros((200, 250), np.float32)} for _ in range(4)]
    sigma, clip = 1.5, 0.8
    noise = noisy_average(deltas, clip, sigma, np.random.default_rng(0))["w"]
    assert noise.std() == pytest.approx(sigma * clip / 4, rel=0.02)
    assert abs(noise.mean()) < 0.01


def test_mismatched_updates_are_refused():
    with pytest.raises(ValueError, match="different tensors"):
        noisy_average([update(0, 1.0), {"other": np.zeros(3, np.float32)}], 1.0, 1.0, np.random.default_rng(0))


@pytest.mark.parametrize("strategy, why", [("flora", "per-client products"), ("lorafair", "non-linear correction")])
def test_user_dp_refuses_strategies_without_one_linear_average(strategy, why):
    with pytest.raises(ValueError, match=why):
        check_user_dp_strategy(strategy)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa", "fedsb"])
def test_user_dp_accepts_linear_average_strategies(strategy):
    check_user_dp_strategy(strategy)


def test_user_level_epsilon_matches_rdp_accountant():
    history = [(1.0, 10 / 100, 5), (1.2, 10 / 100, 10)]
    acc = RDPAccountant()
    for z, q, rounds in history:
        for _ in range(rounds):
            acc.step(noise_multiplier=z, sample_rate=q)
    assert user_level_epsilon(history, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert user_level_epsilon(history[:1], 1e-5) < user_level_epsilon(history, 1e-5)
