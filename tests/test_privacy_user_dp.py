"""User-level DP at the server (fedlora.privacy.user_dp)."""

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedlora.privacy.user_dp import clip_update, noisy_average, update_norm, user_level_epsilon


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


def test_user_level_epsilon_matches_rdp_accountant():
    history = [(1.0, 10 / 100, 5), (1.2, 10 / 100, 10)]
    acc = RDPAccountant()
    for z, q, rounds in history:
        for _ in range(rounds):
            acc.step(noise_multiplier=z, sample_rate=q)
    assert user_level_epsilon(history, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert user_level_epsilon(history[:1], 1e-5) < user_level_epsilon(history, 1e-5)


# ----- the wrapper around a linear strategy -------------------------------------------------
def _wrapped(strategy: str, sigma: float):
    from fedlora.privacy.user_level import UserLevelDP
    from fedlora.run_config import load_config
    from fedlora.strategies.registry import spec_of

    cfg = load_config({"strategy": strategy, "dp.mode": "user", "dp.noise-multiplier": sigma or 1e-9,
                       "dp.max-grad-norm": 1.0, "model.name": "tiny-bert"})
    global_state = {"a.lora_A.weight": np.full((4, 6), 0.1, np.float32), "a.lora_B.weight": np.zeros((5, 4), np.float32)}
    inner = spec_of(strategy).server_class()(cfg, global_state)
    return UserLevelDP(inner, cfg, setup_round=False), global_state


def _round(states):
    from fedlora.server.round import ClientUpdate, Round

    updates = [ClientUpdate(node_id=i + 1, partition_id=i, state=s, num_examples=10 * (i + 1)) for i, s in enumerate(states)]
    return Round(number=1, sampled=[u.node_id for u in updates], population=4, bytes_down=0, sent_at=0.0, updates=updates)


def test_wrapper_releases_global_plus_mean_clipped_delta_and_keeps_the_inner_metrics():
    """With noise ~0: new = global + (1/m) Σ clip(Δ_k, C), unweighted, whatever num-examples says."""
    dp, g = _wrapped("fedavg", 0.0)
    deltas = [update(0, 3.0), update(1, 0.01), update(2, 0.5)]
    done = _round([{k: (g[k] + d[k]).astype(np.float32) for k in g} for d in deltas])
    state, metrics = dp.aggregate(done, np.array([0.7, 0.2, 0.1]))
    for key in g:
        want = g[key] + np.mean([clip_update({k: d[k] for k in g}, 1.0)[key] for d in deltas], axis=0)
        np.testing.assert_allclose(state[key], want, rtol=1e-5, atol=1e-6)
    assert metrics["agg_error"] > 0 and metrics["epsilon"] > 0
    assert dp.history == [(pytest.approx(1e-9), 3 / 4, 1)]


def test_wrapper_noises_only_what_was_uploaded():
    """FFA-LoRA uploads B only: the frozen A stays exact, B gets N(0, (σC/m)²) around the clipped mean."""
    dp, g = _wrapped("ffa", 2.0)
    uploads = [{"a.lora_B.weight": np.zeros((5, 4), np.float32)} for _ in range(2)]
    state, _ = dp.aggregate(_round(uploads), np.array([0.5, 0.5]))
    np.testing.assert_array_equal(state["a.lora_A.weight"], g["a.lora_A.weight"])
    assert 0 < state["a.lora_B.weight"].std() < 3 * 2.0 * 1.0 / 2
