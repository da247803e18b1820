"""The merge log: what each node lacks, and a checkpoint round trip that keeps the exact total."""

import numpy as np

from fedlora.adapters.lora import DENSE_DELTA, LORA_A, LORA_B
from fedlora.server.merges import MergeLog

M = "base_model.model.layer.q"
D, K = 6, 5


def _factors(rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {M + LORA_B: rng.standard_normal((D, rank)), M + LORA_A: rng.standard_normal((rank, K))}


def _product(state: dict[str, np.ndarray]) -> np.ndarray:
    return state[M + LORA_B] @ state[M + LORA_A]


def test_total_is_the_sum_of_every_merge_and_survives_a_checkpoint_round_trip():
    log = MergeLog()
    first, dense_factors, third = _factors(2, 1), _factors(3, 2), _factors(1, 3)
    log.record(1, first)
    log.record(2, {M + DENSE_DELTA: _product(dense_factors)}, dense_factors)  # travels dense, totalled as factors
    log.record(3, {})  # a skipped round
    log.record(4, third)
    expected = _product(first) + _product(dense_factors) + _product(third)
    np.testing.assert_allclose(_product(log.total()), expected, rtol=1e-12, atol=1e-12)
    arrays, values = log.checkpoint()
    restored = MergeLog()
    restored.restore(arrays, values)
    np.testing.assert_array_equal(_product(restored.total()), _product(log.total()))
    assert restored.missing(7, 5).keys() == {f"merge-{j}" for j in (1, 2, 3, 4)}, "a new node gets every merge"
    assert M + DENSE_DELTA in restored.missing(7, 5)["merge-2"], "the dense round still travels dense"
    restored.delivered(3, [7])
    assert restored.missing(7, 5).keys() == {"merge-3", "merge-4"}, "a node gets only the merges after its base"
