"""The weighted stack Σ_i c_i B_i A_i: exact in fp64, forwarded without copies, kept in float64 on a node's disk."""

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from fedlora.adapters.lora import LORA_A, LORA_B, merge_into_base
from fedlora.adapters.stack import COEFFICIENTS, folded_state, stack_terms, term_name, weighted_stack
from fedlora.adapters.transport import from_record, to_record
from fedlora.client.node_store import NodeStore

M = "base_model.model.bert.encoder.layer.0.attention.self.query"
D = K = 8


def _terms(ranks, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((D, r)).astype(dtype), rng.standard_normal((r, K)).astype(dtype)) for r in ranks]


def test_a_stack_keeps_its_terms_and_folds_to_their_weighted_sum():
    terms, c = _terms([1, 3, 2]), [0.25, -1.5, 3.0]
    stack = weighted_stack({M: terms}, c)
    assert [(B is tB, A is tA, ci) for (B, A, ci), (tB, tA) in zip(stack_terms(stack)[M], terms)] == \
        [(True, True, ci) for ci in c]
    plain = folded_state(stack)
    np.testing.assert_allclose(plain[M + LORA_B] @ plain[M + LORA_A], sum(ci * B @ A for ci, (B, A) in zip(c, terms)),
                               rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="3 terms for 2 coefficients"):
        weighted_stack({M: terms}, c[:2])
    broken = dict(stack)
    del broken[term_name(M, LORA_A, 1)]
    with pytest.raises(ValueError, match="term 1 lacks its factors"):
        stack_terms(broken)


def test_forwarded_factors_reuse_the_received_bytes_and_coefficients_stay_float64():
    terms = _terms([2, 2], dtype=np.float32)
    received = from_record(to_record({"b": terms[0][0], "a": terms[0][1]}))
    c = [1 / 3, 2 / 7]  # not representable in float32
    record = to_record(weighted_stack({M: [(received["b"], received["a"]), terms[1]]}, c))
    source = to_record({"b": terms[0][0]})
    assert record[term_name(M, LORA_B, 0)].data is received["b"].base.base, "a received view is sent as its own bytes"
    assert record[term_name(M, LORA_B, 0)].data == source["b"].data
    back = from_record(record)
    assert back[COEFFICIENTS].dtype == np.float64 and back[COEFFICIENTS].tolist() == c
    np.testing.assert_array_equal(back[term_name(M, LORA_A, 1)], terms[1][1])
    cut = to_record({"b": received["b"][1:]})  # a slice is not the payload it views: packed anew, correctly
    np.testing.assert_array_equal(from_record(cut)["b"], terms[0][0][1:])


def test_a_node_keeps_the_float64_coefficients_on_disk(tmp_path):
    stack = weighted_stack({M: _terms([2], dtype=np.float32)}, [1 / 3])
    context = Context(run_id=1, node_id=2, node_config={"state-dir": str(tmp_path)}, state=RecordDict(), run_config={})
    NodeStore(context, partition_id=0, run="r").put("merge-1", stack)
    fresh = Context(run_id=1, node_id=2, node_config={"state-dir": str(tmp_path)}, state=RecordDict(), run_config={})
    loaded = NodeStore(fresh, partition_id=0, run="r").get("merge-1")
    assert loaded[COEFFICIENTS].dtype == np.float64 and loaded[COEFFICIENTS][0] == 1 / 3


def test_merging_a_stack_adds_each_weighted_term_to_the_base():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16, num_labels=2))
    model = get_peft_model(base.double(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    weight = model.get_submodule(M).base_layer.weight
    before = weight.detach().clone()
    terms, c = _terms([2, 1]), [0.7, -0.2]
    merge_into_base(model, weighted_stack({M: terms}, c))
    expected = before + torch.from_numpy(sum(ci * B @ A for ci, (B, A) in zip(c, terms)))
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-13, atol=1e-13)
