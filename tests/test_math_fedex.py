"""FedEx-LoRA against its equations in float64: the residual, the form it travels in, exactness, the merge."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from fedlora.adapters.lora import DENSE_DELTA, LORA_A, LORA_B, merge_into_base
from fedlora.runtime.inprocess import run_inprocess
from fedlora.strategies.common import client_weights
from fedlora.strategies.fedavg.math import average_with_error, fedavg_states
from fedlora.adapters.stack import COEFFICIENTS, folded, folded_state, is_stack, term_name
from fedlora.strategies.fedex.math import residual_coefficients, residual_merge, residual_terms, traffic

M = "base_model.model.enc.query"


def _states(n, d, k, r, seed=0):
    rng = np.random.default_rng(seed)
    return [{M + LORA_A: rng.standard_normal((r, k)).astype(np.float32),
             M + LORA_B: rng.standard_normal((d, r)).astype(np.float32),
             "base_model.model.head.weight": rng.standard_normal((3, d)).astype(np.float32)} for _ in range(n)]


def _p(n):
    return client_weights(list(range(3, 3 + n)), "num-examples")


def test_residual_is_the_exact_gap_between_the_average_product_and_the_product_of_averages():
    states, p = _states(3, 12, 10, 2), _p(3)
    states = [{k: v.astype(np.float64) for k, v in st.items()} for st in states]
    average = {M + LORA_B: sum(w * st[M + LORA_B] for w, st in zip(p, states)),
               M + LORA_A: sum(w * st[M + LORA_A] for w, st in zip(p, states))}
    terms = residual_terms(states, average, M)
    assert [B is st[M + LORA_B] for (B, _), st in zip(terms, states)] == [True] * 3, "the clients' factors, not copies"
    U, V = folded(*zip(*terms), residual_coefficients(p, 1.0))
    assert U.shape == (12, 4 * 2) and V.shape == (4 * 2, 10), "rank ≤ (K+1)r"
    dense = sum(w * B @ A for w, B, A in zip(p, *zip(*terms[:-1]))) - average[M + LORA_B] @ average[M + LORA_A]
    np.testing.assert_allclose(U @ V, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d, k, r, n, dense", [(64, 48, 2, 3, False), (8, 8, 2, 3, True)])
def test_merge_travels_in_the_smaller_form_and_makes_the_update_exact(d, k, r, n, dense):
    states, p, s = _states(n, d, k, r), _p(n), 2.0
    average = fedavg_states(states, p)
    merge, factors, metrics = residual_merge(states, p, average, s)
    assert (M + DENSE_DELTA in merge) == dense and is_stack(merge) == (not dense)
    assert ((n + 1) * r * (d + k) < d * k) == (not dense)
    ideal = sum(w * s * st[M + LORA_B].astype(np.float64) @ st[M + LORA_A].astype(np.float64) for w, st in zip(p, states))
    base_part = s * average[M + LORA_B].astype(np.float64) @ average[M + LORA_A].astype(np.float64)
    exact = sum(c * B.astype(np.float64) @ A.astype(np.float64)
                for (B, A), c in zip(residual_terms(states, average, M), residual_coefficients(p, s)))
    np.testing.assert_allclose(base_part + exact, ideal, rtol=1e-12, atol=1e-10)
    assert factors[COEFFICIENTS].dtype == np.float64 and factors[term_name(M, LORA_B, 0)] is states[0][M + LORA_B]
    if dense:
        travelled = merge[M + DENSE_DELTA].astype(np.float64)
        np.testing.assert_allclose(travelled, exact, rtol=1e-6, atol=1e-6)
        dense_error = np.sqrt(np.sum((base_part + travelled - ideal) ** 2) / np.sum(ideal**2))
        assert 0 < metrics["agg_error"] < 1e-6
        assert metrics["agg_error"] == pytest.approx(dense_error, rel=1e-3, abs=1e-9), "the float32 rounding, exactly"
    else:
        assert merge is factors and metrics["agg_error"] == 0.0, "the stack is the residual exactly"
    folded_total = folded_state(factors, np.float64)
    np.testing.assert_allclose(folded_total[M + LORA_B] @ folded_total[M + LORA_A], exact, rtol=1e-12, atol=1e-10)
    assert average_with_error(states, p, s)[1]["agg_error"] > 1e-2, "what the residual repairs is FedIT's error"


def test_a_dense_delta_merges_into_the_base_weight():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16, num_labels=2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    module = "base_model.model.bert.encoder.layer.0.attention.self.query"
    weight = model.get_submodule(module).base_layer.weight
    before = weight.detach().clone()
    delta = np.random.default_rng(1).standard_normal(tuple(weight.shape)).astype(np.float32)
    merge_into_base(model, {module + DENSE_DELTA: delta})
    torch.testing.assert_close(weight.detach(), before + torch.from_numpy(delta))


def test_the_contract_switches_to_dense_where_it_is_smaller():
    adapter = {M + LORA_A: (4, 32), M + LORA_B: (32, 4), "base_model.model.head.weight": (3, 32)}
    factored = traffic("down", 2, adapter, 2)
    assert factored[f"merge-1/{term_name(M, LORA_A, 2)}"] == (4, 32) and factored[f"merge-1/{COEFFICIENTS}"] == (3,), \
        "(2+1)·4·64 < 32·32: the clients' and the averages' factors with their coefficients"
    assert traffic("down", 2, adapter, 4)[f"merge-1/{M}{DENSE_DELTA}"] == (32, 32), "(4+1)·4·64 ≥ 32·32: dense"
    assert traffic("down", 1, adapter, 4) == adapter and traffic("up", 3, adapter, 4) == adapter


def test_four_clients_send_dense_residuals_and_stay_exact(tmp_path):
    """tiny-bert (d = k = 32, r = 4) with 4 clients: (K+1)r(d+k) = 1280 > d·k = 1024, so every residual travels dense."""
    out = tmp_path / "run"
    run_inprocess({"strategy": "fedex", "model.name": "tiny-bert", "num-server-rounds": 3, "local-steps": 2,
                   "batch-size": 8, "dataset.max-length": 32, "lora.rank": 4, "output-dir": str(out)}, num_nodes=4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["num_clients"] == 4 and r["agg_error"] < 1e-5 and r["dense_modules"] == 4 for r in records[1:])
    assert records[2]["bytes_down"] > records[1]["bytes_down"], "from round 2 on, the residual travels down"
