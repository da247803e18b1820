"""Aggregation math of every strategy against its equations, in float64 with random factors."""


import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from fedlora.adapters.lora import LORA_A, LORA_B, adapter_state, load_adapter_state, lora_modules, merge_into_base
from fedlora.adapters.lorasb import LORASB_A, LORASB_B, LORASB_R
from fedlora.strategies.fedavg import math as fedavg_math
from fedlora.strategies.fedsb import math as fedsb_math
from fedlora.strategies.ffa import math as ffa_math
from fedlora.strategies.common import (
    MIN_SUM_BLOCK, SUM_BUFFER_BYTES, aggregate_extras, client_weights, concat_factors, gram_basis, stack_product, sum_block,
    svd_of_stack, weighted_sum,
)
from fedlora.strategies.error_norms import (
    averaging_error2, difference_grams, error_ratio, factor_gram, gram_norm2, grams_norm2, rounding_error2, split_norms2, stack_norms2,
    stack_blocks, stack_rounding,
)
from fedlora.strategies.fedavg.math import fedavg_states
from fedlora.strategies.fedsb.math import lorasb_init, lorasb_init_states
from fedlora.strategies.ffa.math import trainable_part
from fedlora.adapters.stack import COEFFICIENTS, folded, folded_state, stack_terms
from fedlora.strategies.flora.math import stacked_state
from fedlora.strategies.lorafair.math import aggregate_lorafair, centred_cross, correct_module, lorafair_module

D, K = 12, 10
MODULES = ["base_model.model.enc.0.query", "base_model.model.enc.0.value"]
HEAD = "base_model.model.classifier.weight"


def _weights(n: int, seed: int = 0) -> np.ndarray:
    return client_weights(np.random.default_rng(seed).integers(5, 50, size=n).tolist(), "num-examples")


def _lora_states(ranks, seed=0, shared_A=False):
    """Client adapter states in float64: LoRA pairs for MODULES (rank r_k each) plus a head."""
    rng = np.random.default_rng(seed)
    common_A = {m: rng.standard_normal((ranks[0], K)) for m in MODULES}
    states = []
    for r in ranks:
        state = {HEAD: rng.standard_normal((3, D))}
        for m in MODULES:
            state[m + LORA_A] = common_A[m].copy() if shared_A else rng.standard_normal((r, K))
            state[m + LORA_B] = rng.standard_normal((D, r))
        states.append(state)
    return states


def ideal_update(Bs, As, scales, p):
    """Dense reference ΔW* = Σ_k p_k s_k B_k A_k in float64."""
    return sum(pk * sk * (np.asarray(B, np.float64) @ np.asarray(A, np.float64)) for pk, sk, B, A in zip(p, scales, Bs, As))


def _factors(states, m):
    return [s[m + LORA_B] for s in states], [s[m + LORA_A] for s in states]


def fedavg_error(states, p, scale):
    return fedavg_math.average_with_error(states, p, scale)[1]["agg_error"]


def dense_ratio(pairs) -> float:
    """sqrt(Σ‖applied − ideal‖²) / sqrt(Σ‖ideal‖²) over (applied, ideal) dense float64 matrices."""
    pairs = list(pairs)
    return float(np.sqrt(sum(np.linalg.norm(a - i) ** 2 for a, i in pairs) / sum(np.linalg.norm(i) ** 2 for _, i in pairs)))


# ----- factored norms ------------------------------------------------------------------------
@pytest.mark.parametrize("m", [3, 40])
def test_gram_norms_equal_the_dense_ones(m):
    rng = np.random.default_rng(7)
    U, V = rng.standard_normal((30, m)), rng.standard_normal((m, 20))
    np.testing.assert_allclose(factor_gram(U, "left"), U.T @ U, rtol=1e-14)
    np.testing.assert_allclose(factor_gram(V, "right"), V @ V.T, rtol=1e-14)
    assert gram_norm2(U, V) == pytest.approx(np.linalg.norm(U @ V) ** 2, rel=1e-12)
    assert grams_norm2(U.T @ U, V @ V.T) == gram_norm2(U, V)


@pytest.mark.parametrize("clients", [1, 3, 50])
def test_weighted_sum_is_the_float64_sum_over_blocks_of_its_buffer(clients, monkeypatch):
    monkeypatch.setattr("fedlora.strategies.common.SUM_BUFFER_BYTES", 8 * 64 * clients + 8)  # 64-element blocks
    monkeypatch.setattr("fedlora.strategies.common.MIN_SUM_BLOCK", 16)
    assert sum_block(clients) == 64
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((7, 29)).astype(np.float32) for _ in range(clients)]  # 203 elements: 3 blocks + a part
    p = _weights(clients)
    total = weighted_sum(xs, p)
    assert total.dtype == np.float64 and total.shape == (7, 29)
    np.testing.assert_allclose(total, sum(pk * x.astype(np.float64) for pk, x in zip(p, xs)), rtol=1e-13, atol=1e-15)


def test_weighted_sum_blocks_are_powers_of_two_within_the_buffer():
    assert (sum_block(2), sum_block(10), sum_block(50)) == (1 << 18, 1 << 15, 1 << 14)
    for clients in (1, 2, 10, 50, 100, 10**6):
        block = sum_block(clients)
        assert block & (block - 1) == 0, block
        assert block == MIN_SUM_BLOCK or clients * block * 8 <= SUM_BUFFER_BYTES < clients * 2 * block * 8


@pytest.mark.parametrize("clients", [1, 2, 4])
def test_averaging_error_and_ideal_equal_the_dense_norms(clients):
    rng = np.random.default_rng(3)
    Bs, As = [rng.standard_normal((D, 3)) for _ in range(clients)], [rng.standard_normal((3, K)) for _ in range(clients)]
    p, s = _weights(clients), 2.5
    B_bar, A_bar = weighted_sum(Bs, p), weighted_sum(As, p)
    ideal = ideal_update(Bs, As, [s] * clients, p)
    error2, ideal2 = averaging_error2(Bs, As, p, B_bar, A_bar, s)
    assert error2 == pytest.approx(np.linalg.norm(ideal - s * B_bar @ A_bar) ** 2, rel=1e-10, abs=1e-20)
    assert ideal2 == pytest.approx(np.linalg.norm(ideal) ** 2, rel=1e-12)
    assert (error2 > 0) == (clients > 1)


def test_averaging_error_of_float32_uploads_keeps_its_precision_when_clients_nearly_agree():
    """Centred factors: a spread of 1e-3 between clients still gives the error to 1e-4, in float32 Grams."""
    rng = np.random.default_rng(9)
    B0, A0 = rng.standard_normal((64, 4)), rng.standard_normal((4, 48))
    Bs = [(B0 + 1e-3 * rng.standard_normal(B0.shape)).astype(np.float32) for _ in range(5)]
    As = [(A0 + 1e-3 * rng.standard_normal(A0.shape)).astype(np.float32) for _ in range(5)]
    p = _weights(5)
    B_bar, A_bar = weighted_sum(Bs, p), weighted_sum(As, p)
    exact = ideal_update(Bs, As, [1.0] * 5, p) - B_bar @ A_bar
    error2, _ = averaging_error2(Bs, As, p, B_bar, A_bar)
    assert np.sqrt(error2) == pytest.approx(np.linalg.norm(exact), rel=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("limit, value", [("ROW_BLOCK", 5), ("BLOCK_BYTES", 5 * 9 * 8 + 7)])
def test_difference_grams_are_the_grams_of_the_scaled_difference_stack(side, limit, value, monkeypatch):
    monkeypatch.setattr(f"fedlora.strategies.error_norms.{limit}", value)  # blocks of 5 rows (9 wide), a partial one
    monkeypatch.setattr("fedlora.strategies.error_norms.MIN_ROWS", 1)
    rng = np.random.default_rng(6)
    shape = (D, 3) if side == "left" else (3, D)
    factors, reference = [rng.standard_normal(shape) for _ in range(3)], rng.standard_normal(shape)
    coefficients, probe = [0.5, 1.0, -2.0], rng.standard_normal((D, 2) if side == "left" else (2, D))
    parts = [c * (F - reference) for F, c in zip(factors, coefficients)]
    stack = np.concatenate(parts, axis=1 if side == "left" else 0)
    gram, cross = difference_grams(factors, reference, coefficients, probe, side)
    if side == "left":
        np.testing.assert_allclose(gram, stack.T @ stack, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cross, probe.T @ stack, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_allclose(gram, stack @ stack.T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cross, probe @ stack.T, rtol=1e-12, atol=1e-12)


def test_stack_blocks_hold_as_many_rows_as_block_bytes_allow_yet_at_least_min_rows(monkeypatch):
    factors = [np.ones((D, 3), dtype=np.float32) for _ in range(3)]  # 9 columns of 4 bytes: 36 bytes a row
    monkeypatch.setattr("fedlora.strategies.error_norms.BLOCK_BYTES", 5 * 36 + 35)
    monkeypatch.setattr("fedlora.strategies.error_norms.MIN_ROWS", 1)
    assert [(rows.start, rows.stop) for rows, _ in stack_blocks(factors, "left", np.float32)] == [(0, 5), (5, 10), (10, 12)]
    monkeypatch.setattr("fedlora.strategies.error_norms.MIN_ROWS", 8)  # a wide stack still gets blocks of 8 rows
    assert [(rows.start, rows.stop) for rows, _ in stack_blocks(factors, "left", np.float32)] == [(0, 8), (8, 12)]
    monkeypatch.setattr("fedlora.strategies.error_norms.BLOCK_BYTES", 1 << 20)
    assert [(rows.start, rows.stop) for rows, _ in stack_blocks(factors, "left", np.float32)] == [(0, 12)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_difference_grams_of_a_plain_stack_of_mixed_ranks(side, monkeypatch):
    monkeypatch.setattr("fedlora.strategies.error_norms.ROW_BLOCK", 5)
    rng = np.random.default_rng(7)
    ranks, coefficients = [4, 2, 3], [1.5, -0.5, 2.0]
    factors = [rng.standard_normal((D, r) if side == "left" else (r, D)) for r in ranks]
    stack = np.concatenate([c * F for F, c in zip(factors, coefficients)], axis=1 if side == "left" else 0)
    gram, cross = difference_grams(factors, None, coefficients, None, side)
    assert cross is None
    np.testing.assert_allclose(gram, stack.T @ stack if side == "left" else stack @ stack.T, rtol=1e-12, atol=1e-12)


def test_rounding_error_is_the_float32_rounding_of_the_middle_factor():
    rng = np.random.default_rng(4)
    L, X, F = rng.standard_normal((D, 3)), rng.standard_normal((3, 3)), rng.standard_normal((3, K))
    X32 = X.astype(np.float32)
    error2, ideal2 = rounding_error2(X, X32, F @ F.T, 0.5, left_gram=L.T @ L)
    dense = 0.5 * L @ (X32.astype(np.float64) - X) @ F
    assert error2 == pytest.approx(np.linalg.norm(dense) ** 2, rel=1e-8) and error2 > 0
    assert ideal2 == pytest.approx(np.linalg.norm(0.5 * L @ X @ F) ** 2, rel=1e-12)
    Y = rng.standard_normal((D, 3))
    error2, ideal2 = rounding_error2(Y, Y.astype(np.float32), F @ F.T)
    assert error2 == pytest.approx(np.linalg.norm((Y.astype(np.float32) - Y) @ F) ** 2, rel=1e-8)
    assert ideal2 == pytest.approx(np.linalg.norm(Y @ F) ** 2, rel=1e-12)


def test_stack_norms_measure_the_rounding_of_the_right_factor():
    rng = np.random.default_rng(5)
    U, As, c = rng.standard_normal((D, 6)), [rng.standard_normal((2, K)) for _ in range(3)], [0.3, 1.7, -1.0]
    V = np.concatenate([ci * A for ci, A in zip(c, As)])
    V32 = V.astype(np.float32).astype(np.float64)
    rounding = stack_rounding(V32, As, c)
    np.testing.assert_allclose(rounding, V32 - V, rtol=1e-12, atol=1e-20)
    error2, ideal2 = stack_norms2(U, V32, rounding)
    assert error2 == pytest.approx(np.linalg.norm(U @ (V32 - V)) ** 2, rel=1e-8)
    assert ideal2 == pytest.approx(np.linalg.norm(U @ V) ** 2, rel=1e-6)
    _, head2 = stack_norms2(U, V32, rounding, ideal_inner=4)
    assert head2 == pytest.approx(np.linalg.norm(U[:, :4] @ V32[:4]) ** 2, rel=1e-12)


def test_error_ratio_sums_modules_in_quadrature():
    assert error_ratio(iter([(1.0, 4.0), (3.0, 12.0)])) == pytest.approx(np.sqrt(4.0 / 16.0))
    assert error_ratio(iter([(0.0, 0.0)])) == 0.0


def test_split_norms_are_the_whole_and_the_trailing_product():
    rng = np.random.default_rng(8)
    U, V = rng.standard_normal((D, 7)), rng.standard_normal((7, K))
    whole, tail = split_norms2(U.T @ U, V @ V.T, 3)
    assert whole == pytest.approx(np.linalg.norm(U @ V) ** 2, rel=1e-12)
    assert tail == pytest.approx(np.linalg.norm(U[:, 3:] @ V[3:]) ** 2, rel=1e-12)


# ----- FedAvg (FedIT) -----------------------------------------------------------------
def test_fedavg_error_is_the_cross_term():
    states, p = _lora_states([4, 4, 4]), _weights(3)
    num, den = 0.0, 0.0
    for m in MODULES:
        Bs, As = _factors(states, m)
        B_bar, A_bar = weighted_sum(Bs, p), weighted_sum(As, p)
        cross = sum(pk * (B - B_bar) @ (A - A_bar) for pk, B, A in zip(p, Bs, As))
        ideal = ideal_update(Bs, As, [1.0] * 3, p)
        np.testing.assert_allclose(ideal - B_bar @ A_bar, cross, atol=1e-12)
        assert np.linalg.norm(cross) > 0.1
        num += np.sum(cross**2)
        den += np.sum(ideal**2)
    np.testing.assert_allclose(fedavg_error(states, p, 2.0), np.sqrt(num / den), rtol=1e-5)


def test_fedavg_is_exact_when_A_is_shared():
    states, p = _lora_states([4, 4, 4], shared_A=True), _weights(3)
    for m in MODULES:
        Bs, As = _factors(states, m)
        np.testing.assert_allclose(weighted_sum(Bs, p) @ weighted_sum(As, p), ideal_update(Bs, As, [1.0] * 3, p), atol=1e-12)
    assert fedavg_error(states, p, 2.0) < 1e-6  # float32 averages
    assert fedavg_states(states, p)[HEAD].dtype == np.float32


# ----- FFA-LoRA -------------------------------------------------------------------------
def test_ffa_uploads_no_A_and_averages_B_exactly():
    full, p, s = _lora_states([4, 4, 4], shared_A=True), _weights(3), 2.0
    uploads = [trainable_part(st) for st in full]
    assert all(not k.endswith(LORA_A) for u in uploads for k in u) and all(HEAD in u for u in uploads)
    frozen_A = {k: v for k, v in full[0].items() if k.endswith(LORA_A)}
    agg, metrics = ffa_math.average_with_error(uploads, p, frozen_A, s)
    assert set(agg) == set(uploads[0]), "aggregate carries exactly the uploaded tensors; A stays untouched"
    for m in MODULES:
        Bs = [u[m + LORA_B] for u in uploads]
        A = frozen_A[m + LORA_A]
        np.testing.assert_allclose(agg[m + LORA_B], weighted_sum(Bs, p), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s * weighted_sum(Bs, p) @ A, sum(pk * s * B @ A for pk, B in zip(p, Bs)), atol=1e-12)
    np.testing.assert_allclose(agg[HEAD], weighted_sum([u[HEAD] for u in uploads], p), rtol=1e-6, atol=1e-6)
    applied = [(s * agg[m + LORA_B].astype(np.float64) @ frozen_A[m + LORA_A],
                sum(pk * s * u[m + LORA_B] @ frozen_A[m + LORA_A] for pk, u in zip(p, uploads))) for m in MODULES]
    error = metrics["agg_error"]
    assert 0 < error < 1e-6 and error == pytest.approx(dense_ratio(applied), rel=1e-4), "the float32 rounding of B̄"


def test_ffa_rejects_uploads_with_A():
    states = _lora_states([2, 2])
    with pytest.raises(ValueError, match="frozen"):
        ffa_math.average_with_error(states, _weights(2), {}, 1.0)


# ----- FLoRA ------------------------------------------------------------------------------
RANKS = [2, 4, 8]
SCALES = [16 / r for r in RANKS]  # s_k = α / r_k


def test_flora_stack_is_exact_for_mixed_ranks():
    states, p = _lora_states(RANKS), _weights(3)
    for m in MODULES:
        Bs, As = _factors(states, m)
        B_stack, A_stack = folded(Bs, As, [pk * sk for pk, sk in zip(p, SCALES)])
        assert B_stack.shape == (D, sum(RANKS)) and A_stack.shape == (sum(RANKS), K)
        ideal = sum(pk * sk * B @ A for pk, sk, B, A in zip(p, SCALES, Bs, As))
        np.testing.assert_allclose(B_stack @ A_stack, ideal, atol=1e-12)


def test_flora_stacked_state_is_the_clients_factors_with_float64_weights():
    """The merge holds every client's uploaded factors themselves (no copy) and c_k = p_k s_k in float64,
    so folded it is Σ p_k s_k B_k A_k to fp64 precision; the head is averaged apart."""
    states, p = _lora_states(RANKS), _weights(3)
    stacked = stacked_state(states, p, SCALES)
    assert stacked[COEFFICIENTS].dtype == np.float64
    np.testing.assert_array_equal(stacked[COEFFICIENTS], [pk * sk for pk, sk in zip(p, SCALES)])
    terms = stack_terms(stacked)
    assert set(terms) == set(MODULES) and HEAD not in stacked
    folded = folded_state(stacked, np.float64)
    for m in MODULES:
        assert all(B is st[m + LORA_B] and A is st[m + LORA_A] for (B, A, _), st in zip(terms[m], states))
        np.testing.assert_allclose(folded[m + LORA_B] @ folded[m + LORA_A], ideal_update(*_factors(states, m), SCALES, p),
                                   rtol=1e-12, atol=1e-12)
    extras = aggregate_extras(states, p, (LORA_A, LORA_B))
    assert set(extras) == {HEAD}
    np.testing.assert_allclose(extras[HEAD], weighted_sum([s[HEAD] for s in states], p), rtol=1e-6, atol=1e-6)


def test_flora_merge_then_fresh_lora_keeps_the_layer_output():
    """W0 x + B_stack A_stack x (the aggregated model) == (W0 + ΔW) x + s·0·A_fresh x."""
    torch.manual_seed(0)
    states, p = _lora_states(RANKS), _weights(3)
    B_stack, A_stack = folded(*_factors(states, MODULES[0]), [pk * sk for pk, sk in zip(p, SCALES)])
    layer = torch.nn.Linear(K, D, dtype=torch.float64)
    x = torch.randn(5, K, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x) + (x @ torch.from_numpy(A_stack).T) @ torch.from_numpy(B_stack).T
        layer.weight += torch.from_numpy(B_stack @ A_stack)
        A_fresh, B_fresh = torch.randn(4, K, dtype=torch.float64), torch.zeros(D, 4, dtype=torch.float64)
        after = layer(x) + 2.0 * (x @ A_fresh.T) @ B_fresh.T
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


def _tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, num_labels=3)
    base = BertForSequenceClassification(config).eval()
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))


def test_flora_stacked_state_merges_into_a_peft_model():
    """merge_into_base(stacked_state) == adding Σ p_k s_k B_k A_k to each base weight by hand."""
    merged, by_hand = _tiny_bert(), _tiny_bert()
    template = adapter_state(merged)
    rng = np.random.default_rng(1)
    states = [{**{m + LORA_A: rng.standard_normal((r, 32)) for m in lora_modules(template)},
               **{m + LORA_B: rng.standard_normal((32, r)) for m in lora_modules(template)}} for r in RANKS]
    p = _weights(3)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        start = merged(input_ids=ids).logits
    merge_into_base(merged, stacked_state(states, p, SCALES))
    with torch.no_grad():
        for m in lora_modules(template):
            by_hand.get_submodule(m).base_layer.weight += torch.as_tensor(
                ideal_update(*_factors(states, m), SCALES, p), dtype=torch.float32)
    fresh = {k: (np.zeros_like(v) if k.endswith(LORA_B) else rng.standard_normal(v.shape).astype(np.float32))
             for k, v in template.items()}
    load_adapter_state(merged, fresh)
    load_adapter_state(by_hand, fresh)
    with torch.no_grad():
        out = merged(input_ids=ids).logits
        torch.testing.assert_close(out, by_hand(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, start, atol=1e-3), "the merge must change the model"


def test_concat_stacks_adds_rounds():
    p1, p2 = _weights(3, seed=1), _weights(2, seed=2)
    round1, round2 = _lora_states(RANKS, seed=1), _lora_states([8, 2], seed=2)
    s1, s2 = (folded_state(stacked_state(round1, p1, SCALES), np.float64),
              folded_state(stacked_state(round2, p2, [2.0, 8.0]), np.float64))
    both = concat_factors([s1, {**s2, HEAD: np.ones((3, D), np.float32)}])
    assert concat_factors([{}, s2]).keys() == s2.keys()
    np.testing.assert_array_equal(both[HEAD], np.ones((3, D)))
    for m in MODULES:
        assert both[m + LORA_A].shape == (sum(RANKS) + 10, K) and both[m + LORA_B].shape == (D, sum(RANKS) + 10)
        total = ideal_update(*_factors(round1, m), SCALES, p1) + ideal_update(*_factors(round2, m), [2.0, 8.0], p2)
        applied = both[m + LORA_B].astype(np.float64) @ both[m + LORA_A].astype(np.float64)
        np.testing.assert_allclose(applied, total, rtol=1e-5, atol=1e-5)
    only_second = {k: v for k, v in s2.items() if not k.startswith(MODULES[0])}
    partial = concat_factors([s1, only_second])
    np.testing.assert_array_equal(partial[MODULES[0] + LORA_A], s1[MODULES[0] + LORA_A])
    assert partial[MODULES[1] + LORA_A].shape == (sum(RANKS) + 10, K), "a module in one update only is kept as it is"
    three = concat_factors([s1, s2, s1])
    for m in MODULES:
        total = 2 * ideal_update(*_factors(round1, m), SCALES, p1) + ideal_update(*_factors(round2, m), [2.0, 8.0], p2)
        applied = three[m + LORA_B].astype(np.float64) @ three[m + LORA_A].astype(np.float64)
        np.testing.assert_allclose(applied, total, rtol=1e-5, atol=1e-5)


def test_svd_of_a_stack_of_mixed_ranks_from_grams_in_blocks_and_its_products(monkeypatch):
    monkeypatch.setattr("fedlora.strategies.error_norms.ROW_BLOCK", 7)  # the Grams in several blocks and a partial one
    rng = np.random.default_rng(12)
    ranks, coefficients = [2, 5, 3], [0.5, -1.5, 2.0]
    Bs, As = [rng.standard_normal((30, r)) for r in ranks], [rng.standard_normal((r, 20)) for r in ranks]
    total = sum(c * B @ A for c, B, A in zip(coefficients, Bs, As))
    P, sigma, Qt = svd_of_stack(Bs, As, coefficients, 4)
    np.testing.assert_allclose(sigma, np.linalg.svd(total, compute_uv=False)[: len(sigma)], rtol=1e-10, atol=1e-10)
    u, full_sigma, vt = np.linalg.svd(total)
    np.testing.assert_allclose((P * sigma[:4]) @ Qt, (u[:, :4] * full_sigma[:4]) @ vt[:4], rtol=1e-9, atol=1e-9)
    W = rng.standard_normal((sum(ranks), 3))
    np.testing.assert_allclose(stack_product(Bs, W, "left"), np.concatenate(Bs, axis=1) @ W, rtol=1e-12)
    np.testing.assert_allclose(stack_product(As, W.T, "right"), W.T @ np.concatenate(As, axis=0), rtol=1e-12)


def test_svd_of_stack_of_clients_that_started_from_one_adapter_matches_the_dense_svd():
    """Clients' B_k = B₀ + a small update (the stacked columns nearly repeat: κ(U)² ~ 10⁷, the Cholesky route)."""
    rng = np.random.default_rng(19)
    B0, A0 = rng.standard_normal((60, 4)), rng.standard_normal((4, 50))
    Bs = [B0 + 1e-3 * rng.standard_normal(B0.shape) for _ in range(5)]
    As = [A0 + 1e-3 * rng.standard_normal(A0.shape) for _ in range(5)]
    coefficients = list(_weights(5))
    total = sum(c * B @ A for c, B, A in zip(coefficients, Bs, As))
    P, sigma, Qt = svd_of_stack(Bs, As, coefficients, 4)
    u, full_sigma, vt = np.linalg.svd(total)
    np.testing.assert_allclose(sigma[:8], full_sigma[:8], rtol=0, atol=1e-10 * full_sigma[0])
    np.testing.assert_allclose((P * sigma[:4]) @ Qt, (u[:, :4] * full_sigma[:4]) @ vt[:4], atol=1e-10 * full_sigma[0])
    np.testing.assert_allclose(P.T @ P, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(Qt @ Qt.T, np.eye(4), atol=1e-10)


@pytest.mark.parametrize("case", ["full rank", "repeated columns", "a zero factor"])
def test_gram_basis_is_orthonormal_and_rebuilds_the_factor(case, monkeypatch):
    rng = np.random.default_rng(17)
    F = rng.standard_normal((40, 6))
    if case == "repeated columns":  # a client that uploaded another's factor: rank 4 of 6
        F[:, 4:] = F[:, :2]
    if case == "a zero factor":  # FlexLoRA's first round: B = 0
        F[:] = 0.0
    eigh = np.linalg.eigh
    routes = []
    monkeypatch.setattr(np.linalg, "eigh", lambda g: routes.append("eigh") or eigh(g))
    T, R = gram_basis(F.T @ F)
    expected_rank = {"full rank": 6, "repeated columns": 4, "a zero factor": 0}[case]
    assert T.shape == (6, expected_rank) and R.shape == (expected_rank, 6)
    assert routes == ([] if case == "full rank" else ["eigh"]), "Cholesky for full rank, the eigen-route otherwise"
    np.testing.assert_allclose((F @ T).T @ (F @ T), np.eye(expected_rank), atol=1e-12)
    np.testing.assert_allclose((F @ T) @ R, F, atol=1e-12)


def test_stack_product_reads_uploads_of_any_layout_and_precision_in_place():
    rng = np.random.default_rng(13)
    ranks = [2, 5, 3]
    Bs = [rng.standard_normal((r, 30)).T for r in ranks]  # Fortran-ordered views, as no upload is
    As = [rng.standard_normal((r, 40))[:, ::2] for r in ranks]  # strided views
    W = rng.standard_normal((sum(ranks), 4))
    np.testing.assert_allclose(stack_product(Bs, W, "left"), np.concatenate(Bs, axis=1) @ W, rtol=1e-12)
    np.testing.assert_allclose(stack_product(As, W.T, "right"), W.T @ np.concatenate(As, axis=0), rtol=1e-12)
    B32 = [np.ascontiguousarray(B, dtype=np.float32) for B in Bs]
    exact = np.concatenate(B32, axis=1).astype(np.float64) @ W
    in_float64 = stack_product(B32, W, "left")
    assert in_float64.dtype == np.float64
    np.testing.assert_allclose(in_float64, exact, rtol=1e-12)
    in_float32 = stack_product(B32, W, "left", np.float32)
    assert in_float32.dtype == np.float32 and in_float32.flags.c_contiguous
    np.testing.assert_allclose(in_float32, exact, rtol=0, atol=sum(ranks) * 4e-7 * np.abs(exact).max())


@pytest.mark.parametrize("m", [3, 40])
def test_svd_of_one_pair_of_factors_is_the_svd_of_the_product(m):
    rng = np.random.default_rng(11)
    U, V = rng.standard_normal((30, m)), rng.standard_normal((m, 20))
    P, sigma, Qt = svd_of_stack([U], [V], [1.0])
    assert len(sigma) == min(30, 20, m)
    np.testing.assert_allclose(sigma, np.linalg.svd(U @ V, compute_uv=False)[: len(sigma)], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose((P * sigma) @ Qt, U @ V, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(P.T @ P, np.eye(len(sigma)), atol=1e-10)
    np.testing.assert_allclose(Qt @ Qt.T, np.eye(len(sigma)), atol=1e-10)


# ----- LoRA-FAIR ----------------------------------------------------------------------------
def _objective(delta_w, B, A_bar, B_bar, lam):
    return np.sum((delta_w - B @ A_bar) ** 2) + lam * np.sum((B - B_bar) ** 2)


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0, 10.0])
def test_lorafair_correction_is_the_ridge_minimiser(lam, monkeypatch):
    monkeypatch.setattr("fedlora.strategies.error_norms.ROW_BLOCK", 7)  # several blocks over d and k
    states, p = _lora_states([4, 4, 4], seed=3), _weights(3, seed=3)
    Bs, As = _factors(states, MODULES[0])
    A_bar, B_new, before, after = lorafair_module(Bs, As, p, lam)
    B_bar = weighted_sum(Bs, p)
    delta_w = ideal_update(Bs, As, [1.0] * 3, p)
    np.testing.assert_allclose(A_bar, weighted_sum(As, p), atol=1e-15)
    # stationarity of ‖ΔW − (B̄+ΔB)Ā‖² + λ‖ΔB‖²:  (ΔW − B_new Ā) Āᵀ = λ ΔB
    np.testing.assert_allclose((delta_w - B_new @ A_bar) @ A_bar.T, lam * (B_new - B_bar), atol=1e-10)
    best = _objective(delta_w, B_new, A_bar, B_bar, lam)
    assert best <= _objective(delta_w, B_bar, A_bar, B_bar, lam)
    rng = np.random.default_rng(4)
    for _ in range(5):
        assert best <= _objective(delta_w, B_new + 1e-3 * rng.standard_normal(B_new.shape), A_bar, B_bar, lam)
    assert after <= before
    np.testing.assert_allclose(before, np.linalg.norm(delta_w - B_bar @ A_bar), rtol=1e-12)
    np.testing.assert_allclose(after, np.linalg.norm(delta_w - B_new @ A_bar), rtol=1e-12)


@pytest.mark.parametrize("buffer_clients", [1, 2, 5])
def test_centred_cross_is_the_same_in_stacks_of_any_size(buffer_clients, monkeypatch):
    """(A_k − Ā)Āᵀ for every client, whether the buffer holds one client, some (the last stack partial) or all."""
    rng = np.random.default_rng(8)
    As = [rng.standard_normal((3, K)) for _ in range(5)]
    A_bar = weighted_sum(As, _weights(5, seed=8))
    monkeypatch.setattr("fedlora.strategies.error_norms.BLOCK_BYTES", buffer_clients * 3 * K * 8)
    expected = np.vstack([(A - A_bar) @ A_bar.T for A in As])
    np.testing.assert_allclose(centred_cross(As, A_bar), expected, rtol=1e-13, atol=1e-13)


def test_lorafair_large_lambda_is_fedit():
    states, p = _lora_states([4, 4, 4], seed=5), _weights(3)
    Bs, As = _factors(states, MODULES[0])
    _, B_new, before, after = lorafair_module(Bs, As, p, 1e12)
    np.testing.assert_allclose(B_new, weighted_sum(Bs, p), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(after, before, rtol=1e-9)


@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_lorafair_on_float32_uploads_matches_float64_to_float32_precision(spread):
    """The products over float32 uploads run in float32: B̄ + ΔB* to float32 precision of B, and the residual
    after the correction — ΔB* is its own product — to float32 precision of ΔB*, even when ΔB* ≪ B."""
    rng = np.random.default_rng(21)
    A = rng.standard_normal((4, K))
    Bs = [rng.standard_normal((D, 4)).astype(np.float32) for _ in range(3)]
    As = [(A + spread * rng.standard_normal((4, K))).astype(np.float32) for _ in range(3)]
    p = _weights(3, seed=21)
    A_bar, B_new, before, after = lorafair_module(Bs, As, p, 0.01)
    A_64, B_64, before_64, after_64 = lorafair_module([B.astype(np.float64) for B in Bs],
                                                      [A.astype(np.float64) for A in As], p, 0.01)
    assert B_new.dtype == np.float32 and A_bar.dtype == np.float64
    np.testing.assert_allclose(A_bar, A_64, rtol=1e-12)
    assert np.linalg.norm(B_new - B_64) <= 1e-6 * np.linalg.norm(B_64)
    np.testing.assert_allclose(before, before_64, rtol=1e-5)
    np.testing.assert_allclose(after, after_64, rtol=1e-5)
    assert after < before


@pytest.mark.parametrize("clients, rank, d", [(10, 16, 4096), (3, 8, 1000), (50, 64, 512)])
def test_lorafair_adapter_is_bit_for_bit_the_same_with_the_metric_on_or_off(clients, rank, d):
    """At shapes where BLAS picks other kernels for other product widths (the tiny end-to-end runs do not)."""
    rng = np.random.default_rng(clients)
    As = [rng.standard_normal((rank, d)).astype(np.float32) for _ in range(clients)]
    Bs = [rng.standard_normal((d, rank)).astype(np.float32) for _ in range(clients)]
    p = _weights(clients, seed=clients)
    off, on = correct_module(Bs, As, p, 0.01, measure=False), correct_module(Bs, As, p, 0.01, measure=True)
    np.testing.assert_array_equal(off[0], on[0])
    np.testing.assert_array_equal(off[1], on[1])


def test_aggregate_lorafair_state_and_metrics():
    states, p = _lora_states([4, 4, 4], seed=6), _weights(3)
    out, metrics = aggregate_lorafair(states, p, 0.01)
    assert set(out) == set(states[0]) and all(v.dtype == np.float32 for v in out.values())
    for m in MODULES:
        A_bar, B_new, _, _ = lorafair_module(*_factors(states, m), p, 0.01)
        np.testing.assert_allclose(out[m + LORA_A], A_bar, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[m + LORA_B], B_new, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[HEAD], weighted_sum([s[HEAD] for s in states], p), rtol=1e-6, atol=1e-6)
    # residual_before is FedIT's relative aggregation error
    np.testing.assert_allclose(metrics["residual_before"], fedavg_error(states, p, 2.0), rtol=1e-4)
    assert metrics["residual_after"] < metrics["residual_before"]
    assert metrics["agg_error"] == metrics["residual_after"]


# ----- Fed-SB -----------------------------------------------------------------------------
def test_lorasb_init_is_the_best_rank_r_approximation():
    G = np.random.default_rng(7).standard_normal((D, K))
    sigma = np.linalg.svd(G, compute_uv=False)
    for r in (1, 3, K):
        B, R0, A = lorasb_init(G, r)
        assert B.shape == (D, r) and R0.shape == (r, r) and A.shape == (r, K)
        np.testing.assert_allclose(np.sum((G - B @ R0 @ A) ** 2), np.sum(sigma[r:] ** 2), atol=1e-12)
        np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-12)
        np.testing.assert_allclose(A @ A.T, np.eye(r), atol=1e-12)
        np.testing.assert_allclose(R0, np.diag(sigma[:r]), atol=1e-12)
        assert np.all(np.diag(R0) > 0), "R0 is not zero"
    with pytest.raises(ValueError, match="rank"):
        lorasb_init(G, K + 1)


def test_fedsb_averaging_R_is_exact():
    rng = np.random.default_rng(8)
    r, s, p = 4, 2.0, _weights(4)
    frozen, initial = lorasb_init_states({m: rng.standard_normal((D, K)) for m in MODULES}, r)
    assert set(frozen) == {m + x for m in MODULES for x in (LORASB_A, LORASB_B)}
    assert set(initial) == {m + LORASB_R for m in MODULES}
    uploads = [{**{m + LORASB_R: rng.standard_normal((r, r)) for m in MODULES}, HEAD: rng.standard_normal((3, D))}
               for _ in range(4)]
    agg, metrics = fedsb_math.average_with_error(uploads, p, frozen, s)
    assert set(agg) == set(uploads[0])
    for m in MODULES:
        B, A = frozen[m + LORASB_B].astype(np.float64), frozen[m + LORASB_A].astype(np.float64)
        Rs = [u[m + LORASB_R] for u in uploads]
        ideal = sum(pk * s * B @ R @ A for pk, R in zip(p, Rs))
        np.testing.assert_allclose(s * B @ weighted_sum(Rs, p) @ A, ideal, atol=1e-12)
        np.testing.assert_allclose(agg[m + LORASB_R], weighted_sum(Rs, p), rtol=1e-6, atol=1e-6)
    pairs = []
    for m in MODULES:
        B, A = frozen[m + LORASB_B].astype(np.float64), frozen[m + LORASB_A].astype(np.float64)
        pairs.append((s * B @ agg[m + LORASB_R].astype(np.float64) @ A,
                      sum(pk * s * B @ u[m + LORASB_R] @ A for pk, u in zip(p, uploads))))
    error = metrics["agg_error"]
    assert 0 < error < 1e-6 and error == pytest.approx(dense_ratio(pairs), rel=1e-4), "the float32 rounding of R̄"
    with pytest.raises(ValueError, match="fixed B or A"):
        fedsb_math.average_with_error([{**u, **frozen} for u in uploads], p, frozen, s)


def test_uploads_with_different_tensors_are_rejected():
    uploads = [{"x" + LORASB_R: np.eye(2)}, {"y" + LORASB_R: np.eye(2)}]
    with pytest.raises(ValueError, match="different tensors"):
        fedsb_math.average_with_error(uploads, _weights(2), {}, 1.0)
