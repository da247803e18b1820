"""The paired two-level bootstrap on synthetic scores with known answers."""

import numpy as np
import pytest

from fedlora.experiments.report.statistics import Scores, bootstrap_intervals, resample_counts


def correctness(rng, seeds, examples, rate):
    return Scores.of((rng.random((seeds, examples)) < rate).astype(float))


def test_resampled_counts_are_draws_with_replacement():
    counts = resample_counts(np.random.default_rng(0), 400, 7)
    assert counts.shape == (400, 7) and (counts.sum(axis=1) == 7).all()
    assert abs(counts.mean() - 1.0) < 1e-12 and 0.7 < counts.var() < 1.0  # binomial(7, 1/7): variance 6/7


def test_identical_methods_give_exactly_zero():
    a = correctness(np.random.default_rng(1), 5, 300, 0.4)
    _, diff = bootstrap_intervals(a, {"same": Scores(a.num.copy(), a.den.copy())}, replicates=300)["same"]
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert not diff.excludes_zero() and (diff.seeds, diff.examples) == (5, 300)


def test_a_constant_shift_gives_exactly_the_shift():
    b = Scores.of(np.random.default_rng(2).random((4, 200)))
    shifted = Scores.of(b.num + 0.03)
    score, diff = bootstrap_intervals(b, {"up": shifted}, replicates=300)["up"]
    assert diff.estimate == pytest.approx(0.03) and diff.low == pytest.approx(0.03) and diff.high == pytest.approx(0.03)
    assert score.estimate == pytest.approx(b.mean() + 0.03) and score.low < score.estimate < score.high
    assert diff.excludes_zero()


def test_reference_entry_and_shape_check():
    a = correctness(np.random.default_rng(3), 3, 100, 0.5)
    out = bootstrap_intervals(a, {}, replicates=200)
    assert set(out) == {""} and out[""][0].estimate == pytest.approx(a.mean()) and out[""][1].estimate == 0.0
    with pytest.raises(ValueError, match="seeds × examples"):
        bootstrap_intervals(a, {"short": correctness(np.random.default_rng(4), 2, 100, 0.5)})


def test_ratio_scores_weight_examples_by_their_tokens():
    """Token loss: Σ nll / Σ tokens per seed, so a long example counts by its tokens."""
    nll = np.array([[2.0, 8.0], [4.0, 4.0]])
    tokens = np.array([[1.0, 4.0], [2.0, 2.0]])
    scores = Scores(nll, tokens)
    assert scores.per_seed().tolist() == [2.0, 2.0] and scores.mean() == 2.0
    with pytest.raises(ValueError, match="S×n"):
        Scores(nll, tokens[:, :1])


def simulate(rng, seeds, examples, delta, seed_sd, example_sd):
    """Two methods on shared examples: a difficulty per example, a method-specific effect per example (shared by
    the seeds) and per (method, seed), and Bernoulli outcomes. The population difference is ``delta``."""
    difficulty = rng.uniform(0.3, 0.6, size=examples)
    per_example = rng.normal(0, example_sd, examples)
    offset_a, offset_b = rng.normal(0, seed_sd, (2, seeds, 1))
    a = (rng.random((seeds, examples)) < difficulty + (delta + per_example) / 2 + offset_a).astype(float)
    b = (rng.random((seeds, examples)) < difficulty - (delta + per_example) / 2 + offset_b).astype(float)
    return Scores.of(a), Scores.of(b)


@pytest.mark.parametrize("seed_sd, example_sd", [(0.0, 0.0), (0.03, 0.0), (0.0, 0.2), (0.02, 0.15)])
def test_intervals_cover_the_true_difference_about_95_percent(seed_sd, example_sd):
    """Coverage over 300 simulated comparisons of 5 seeds × 400 examples: the interaction alone (where the plain
    pigeonhole bootstrap covers ~100%), with seed-to-seed variation, with per-example effects, and with both."""
    rng = np.random.default_rng(5)
    delta, trials, hits = 0.03, 300, 0
    for trial in range(trials):
        a, b = simulate(rng, 5, 400, delta, seed_sd, example_sd)
        _, diff = bootstrap_intervals(b, {"a": a}, replicates=400, seed=trial)["a"]
        hits += diff.low <= delta <= diff.high
    assert 0.93 <= hits / trials <= 0.99, hits


def test_one_seed_is_the_example_bootstrap():
    rng = np.random.default_rng(6)
    hits = 0
    for trial in range(200):
        a, b = simulate(rng, 1, 400, 0.03, 0.0, 0.1)
        _, diff = bootstrap_intervals(b, {"a": a}, replicates=400, seed=trial)["a"]
        hits += diff.low <= 0.03 <= diff.high
    assert 0.9 <= hits / 200 <= 0.99, hits
