"""Bounds on one client's influence: the share cap and the norm bound, exactly, and against the malicious site."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import MetricRecord

from fedlora.adapters.transport import from_record, to_record
from fedlora.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from fedlora.server.influence import capped_shares, norm_ratios, scaled_update
from fedlora.server.validation import InvalidUpdate, validate_upload


@pytest.mark.parametrize("weights, cap", [([0.7, 0.2, 0.1], 0.5), ([1 - 2e-12, 1e-12, 1e-12], 0.5),
                                          ([0.4, 0.35, 0.15, 0.1], 0.3), ([0.2, 0.3, 0.5], 0.6)])
def test_capped_shares_respect_the_cap_and_keep_the_others_proportions(weights, cap):
    p = np.array(weights)
    out = capped_shares(p, cap)
    assert out.sum() == pytest.approx(1.0, abs=1e-12) and np.all(out <= cap + 1e-12)
    free = out < cap - 1e-12
    if free.sum() > 1:
        np.testing.assert_allclose(out[free] / out[free].sum(), p[free] / p[free].sum(), rtol=1e-12)
    if np.all(p <= cap):
        np.testing.assert_array_equal(out, p)


def test_an_unreachable_cap_gives_uniform_weights():
    np.testing.assert_array_equal(capped_shares(np.array([0.9, 0.1]), 0.5), [0.5, 0.5])
    np.testing.assert_array_equal(capped_shares(np.array([0.6, 0.3, 0.1]), 0.2), [1 / 3] * 3)
    np.testing.assert_array_equal(capped_shares(np.array([0.6, 0.4]), 1.0), [0.6, 0.4])


def test_norm_ratios_compare_each_update_with_the_median_of_the_others():
    np.testing.assert_allclose(norm_ratios(np.array([1.0, 2.0, 3.0, 100.0])), [1 / 3, 2 / 3, 3 / 2, 50.0])
    np.testing.assert_array_equal(norm_ratios(np.array([4.0])), [1.0])
    assert norm_ratios(np.array([0.0, 0.0, 1.0]))[2] == np.inf


@pytest.mark.parametrize("size", [2, 3, 4, 5, 10, 11])
def test_norm_ratios_equal_each_leave_one_out_median_with_ties_and_zeros(size):
    rng = np.random.default_rng(size)
    for norms in (rng.random(size) * 10, rng.choice([0.0, 1.0, 2.5, 4.0], size), np.zeros(size)):
        expected = []
        for k in range(size):
            median = np.median(np.delete(norms, k))
            expected.append(norms[k] / median if median > 0 else (np.inf if norms[k] > 0 else 1.0))
        np.testing.assert_array_equal(norm_ratios(norms), expected)


def update_norm(upload, reference) -> float:
    """‖upload − reference‖ as validation measures it: no same-shaped reference counts as zero."""
    shapes = {k: v.shape for k, v in upload.items()}
    return float(np.sqrt(validate_upload(upload, shapes, max_rms=1e9, reference=reference)))


def test_update_norms_and_scaling_are_relative_to_the_reference(monkeypatch):
    monkeypatch.setattr("fedlora.server.validation.BLOCK", 5)  # several blocks per tensor and a partial one
    rng = np.random.default_rng(0)
    ref = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    upload = {"a": ref["a"] + 2.0, "b": ref["b"] - 1.0, "fresh": np.full(2, 3.0, np.float32)}
    delta = np.concatenate([np.full(12, 2.0), np.full(5, -1.0), np.full(2, 3.0)])
    assert update_norm(upload, ref) == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    half = scaled_update(upload, ref, 0.5)
    np.testing.assert_allclose(half["a"], ref["a"] + 1.0, rtol=1e-6)
    np.testing.assert_allclose(half["fresh"], 1.5)
    assert update_norm(half, ref) == pytest.approx(0.5 * np.linalg.norm(delta), rel=1e-6)
    assert update_norm({"a": np.ones((2, 2), np.float32)}, ref) == pytest.approx(2.0), "other shape: against zero"


def test_validation_shows_every_tensor_that_passed_to_the_observer_while_it_validates():
    rng = np.random.default_rng(1)
    upload = {"b": rng.standard_normal((4, 2)).astype(np.float32), "a": rng.standard_normal((2, 3)).astype(np.float32)}
    shapes = {k: v.shape for k, v in upload.items()}
    seen: list[tuple[str, np.ndarray]] = []
    validate_upload(upload, shapes, max_rms=10.0, observe=lambda key, tensor: seen.append((key, tensor)))
    assert [k for k, _ in seen] == ["a", "b"] and all(tensor is upload[k] for k, tensor in seen)
    seen.clear()
    with pytest.raises(InvalidUpdate, match="'b' has 1 non-finite"):
        validate_upload({**upload, "b": np.where(np.arange(8).reshape(4, 2) == 3, np.nan, upload["b"]).astype(np.float32)},
                        shapes, max_rms=10.0, observe=lambda key, tensor: seen.append((key, tensor)))
    assert [k for k, _ in seen] == ["a"], "a tensor that fails is not observed"


# ----- the malicious site of the issue, in process ---------------------------------------------------
class MaliciousSite:
    """fedlora's ClientApp, except that partition 0 reports 10**12 examples and sets every uploaded value to 9.5;
    it also records the norm of every honest update (against the global state the node received)."""

    def __init__(self) -> None:
        from fedlora.client.app import app

        self.app = app
        self.honest_norms: list[float] = []

    def __call__(self, message, context):
        reply = self.app(message, context)
        if reply.has_error():
            return reply
        upload = from_record(reply.content[ARRAYS])
        if context.node_config["partition-id"] != 0:
            received = from_record(message.content[ARRAYS])
            self.honest_norms.append(float(np.sqrt(sum(np.sum((v.astype(np.float64) - received[k]) ** 2)
                                                       for k, v in upload.items()))))
            return reply
        reply.content[ARRAYS] = to_record({k: np.full_like(v, 9.5) for k, v in upload.items()})
        reply.content[METRICS] = MetricRecord({**dict(reply.content[METRICS]), NUM_EXAMPLES: 10**12})
        return reply


def attacked_round(tmp_path, **bounds) -> tuple[dict, float, list[float]]:
    """One FedAvg round on tiny-bert, 4 sites, partition 0 malicious: its record, ‖global change‖, honest norms."""
    from fedlora.runtime.inprocess import run_inprocess
    from fedlora.server.rounds import RoundLoop

    site, states = MaliciousSite(), []
    original = RoundLoop.train_round

    def spy(self, grid, number):
        before = dict(self.strategy.state)
        record = original(self, grid, number)
        states.append((before, dict(self.strategy.state)))
        return record

    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    RoundLoop.train_round = spy
    try:
        run_inprocess({"model.name": "tiny-bert", "num-server-rounds": 1, "local-steps": 2, "batch-size": 8,
                       "dataset.max-length": 32, "output-dir": str(out), **bounds}, num_nodes=4, client_app=site)
    finally:
        RoundLoop.train_round = original
    before, after = states[0]
    change = float(np.sqrt(sum(np.sum((after[k].astype(np.float64) - before[k]) ** 2) for k in before)))
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    return record, change, site.honest_norms


def test_the_malicious_site_is_clipped_and_capped_and_the_global_update_stays_within_the_caps(tmp_path):
    record, change, honest = attacked_round(tmp_path)
    assert record["num_clients"] == 4 and "rejected" not in record
    notes = record["clipped"]
    assert any("(partition 0): update norm" in n and "scaled down to validation.max-norm-ratio = 5×" in n for n in notes)
    assert any("(partition 0): weight 1 capped at 0.5 (validation.max-share = 0.5)" in n for n in notes), notes
    bound = 0.5 * 5.0 * float(np.median(honest)) + 0.5 * max(honest)
    assert change <= bound * (1 + 1e-5), (change, bound)
    unbounded, free_change, _ = attacked_round(tmp_path, **{"validation.max-share": 1.0, "validation.max-norm-ratio": 0.0})
    assert "clipped" not in unbounded and free_change > 100 * bound, "without the bounds the attacker takes the model"
