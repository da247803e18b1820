"""The merge log: what each node lacks, and a checkpoint round trip that keeps the exact total."""

import numpy as np

from fedlora.adapters.lora import DENSE_DELTA, LORA_A, LORA_B
from fedlora.adapters.stack import COEFFICIENTS, weighted_stack
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
    a, b = _factors(2, 4), _factors(3, 5)
    log.record(5, weighted_stack({M: [(a[M + LORA_B], a[M + LORA_A]), (b[M + LORA_B], b[M + LORA_A])]}, [0.3, -1.7]))
    expected = _product(first) + _product(dense_factors) + _product(third) + 0.3 * _product(a) - 1.7 * _product(b)
    np.testing.assert_allclose(_product(log.total()), expected, rtol=1e-12, atol=1e-12)
    arrays, values = log.checkpoint()
    restored = MergeLog()
    restored.restore(arrays, values)
    np.testing.assert_array_equal(_product(restored.total()), _product(log.total()))
    assert restored.missing(7, 6).keys() == {f"merge-{j}" for j in (1, 2, 3, 4, 5)}, "a new node gets every merge"
    assert M + DENSE_DELTA in restored.missing(7, 6)["merge-2"], "the dense round still travels dense"
    assert restored.missing(7, 6)["merge-5"][COEFFICIENTS].dtype == np.float64, "a stack keeps its float64 weights"
    restored.delivered(3, [7])
    assert restored.missing(7, 6).keys() == {"merge-3", "merge-4", "merge-5"}, "only the merges after its base"
