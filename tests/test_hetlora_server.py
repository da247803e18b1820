"""HetLoRA's server round: the factor Grams its sparsity weights need are made while validation reads each upload."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import server_round
from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.transport import from_record, to_record
from fedlora.protocol import ARRAYS
from fedlora.strategies.error_norms import factor_gram
from fedlora.strategies.hetlora.math import aggregate_hetlora

RANK, CLIENTS = 4, 4


def test_the_round_uses_the_grams_of_validation_and_makes_them_anew_for_a_rescaled_update(monkeypatch):
    monkeypatch.setattr(server_round, "D", 64)
    monkeypatch.setattr(server_round, "K_IN", 48)
    adapter = server_round.adapter_shapes(1, RANK)
    messages, replies = server_round.replies_for("hetlora", adapter, CLIENTS, RANK)
    outlier = replies[0].content
    outlier[ARRAYS] = to_record({k: 20 * v for k, v in from_record(outlier[ARRAYS]).items()})  # past the norm bound
    loop = server_round.server_loop("hetlora", adapter, RANK, agg_error_every=1)
    server, seen = loop.strategy, {}
    aggregate = server.aggregate

    def spy(done, weights):
        seen["updates"], seen["weights"] = [(u.node_id, dict(u.observed), dict(u.state)) for u in done.updates], weights
        return aggregate(done, weights)

    monkeypatch.setattr(server, "aggregate", spy)
    record = server_round.fedlora_round(loop, messages, replies)

    assert any("node 1 (partition 0): update norm" in note for note in record["clipped"])
    factors = [k for k in adapter if k.endswith((LORA_A, LORA_B))]
    for node, observed, state in seen["updates"]:
        if node == 1:
            assert observed == {}, "the rescaled update's Grams are made again from its new factors"
            continue
        assert sorted(observed) == sorted(factors)
        for key in factors:
            expected = factor_gram(state[key], "left" if key.endswith(LORA_B) else "right")
            np.testing.assert_array_equal(observed[key], expected)
    states = [state for _, _, state in seen["updates"]]
    scales = [server.cfg.lora.alpha / RANK] * CLIENTS
    again, metrics = aggregate_hetlora(states, seen["weights"], scales, RANK, server.global_scale)
    assert all(np.array_equal(server.state[k], again[k]) for k in again), "the same adapter as without the Grams of validation"
    assert record["agg_error"] == pytest.approx(metrics["agg_error"], rel=1e-12)
