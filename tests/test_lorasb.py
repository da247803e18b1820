"""LoRA-SB adapter surgery: forward formula, injection, state, gradient estimate, peft export."""

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from fedlora.adapters.lora import load_adapter_state
from fedlora.adapters.lorasb import (
    LORASB_A, LORASB_B, LORASB_R, LoraSBLinear, gradient_estimate, inject_lorasb, load_lorasb_state,
    lorasb_factors, lorasb_frozen_state, lorasb_state, to_peft_lora,
)
from fedlora.strategies.fedsb.math import lorasb_init_states

TARGETS = ["query", "value"]
RANK = 4


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, num_labels=3)
    return BertForSequenceClassification(config).eval()


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 100, (4, 6), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def _loss(model, batch):
    return model(**batch).loss


def _random_factors(model, seed=1):
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((32, RANK)), rng.standard_normal((RANK, RANK)), rng.standard_normal((RANK, 32)))
            for name, m in model.named_modules() if name.endswith(tuple(TARGETS))}


def test_forward_is_the_dense_formula():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = torch.nn.Linear(7, 5, dtype=torch.float64)
    B, R, A = rng.standard_normal((5, 3)), rng.standard_normal((3, 3)), rng.standard_normal((3, 7))
    layer = LoraSBLinear(copy.deepcopy(base), B, R, A, scale=0.5)
    x = torch.randn(4, 7, dtype=torch.float64)
    expected = x @ (base.weight + 0.5 * torch.from_numpy(B @ R @ A)).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lorasb_R.weight"]
    with pytest.raises(ValueError, match="do not fit"):
        LoraSBLinear(base, B.T, R, A, scale=0.5)


def test_inject_trains_only_R_and_head_and_state_round_trips():
    model = _bert()
    factors = _random_factors(model)
    inject_lorasb(model, TARGETS, RANK, 2.0, factors, modules_to_save=["classifier"])
    state = lorasb_state(model)
    assert {k for k in state if k.endswith(LORASB_R)} == {m + LORASB_R for m in factors}
    assert set(state) - {m + LORASB_R for m in factors} == {"classifier.weight", "classifier.bias"}
    assert all(state[m + LORASB_R].shape == (RANK, RANK) for m in factors)
    frozen = lorasb_frozen_state(model)
    assert set(frozen) == {m + x for m in factors for x in (LORASB_A, LORASB_B)}
    np.testing.assert_allclose(frozen[next(iter(factors)) + LORASB_B], next(iter(factors.values()))[0], rtol=1e-6)

    rng = np.random.default_rng(2)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()}
    load_lorasb_state(model, new)
    for k, v in lorasb_state(model).items():
        np.testing.assert_array_equal(v, new[k])
    with pytest.raises(ValueError, match="missing"):
        load_lorasb_state(model, {k: v for k, v in new.items() if k != "classifier.bias"})
    with pytest.raises(ValueError, match="shape"):
        load_lorasb_state(model, {**new, "classifier.bias": np.zeros(7, np.float32)})


def test_inject_rejects_factors_that_do_not_match_targets():
    model = _bert()
    factors = _random_factors(model)
    factors.pop(next(iter(factors)))
    with pytest.raises(ValueError, match="do not match"):
        inject_lorasb(model, TARGETS, RANK, 2.0, factors)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lorasb(_bert(), ["q_proj"], RANK, 2.0, {})


def test_gradient_estimate_matches_autograd():
    model, reference = _bert(), _bert()
    model.requires_grad_(False)
    batches = _batches(3)
    estimate = gradient_estimate(model, batches, TARGETS, _loss)
    assert all(not p.requires_grad for p in model.parameters()), "requires_grad flags are restored"
    assert all(p.grad is None for p in model.parameters()), "no .grad is left behind"
    for batch in batches:
        (_loss(reference, batch) / len(batches)).backward()
    names = [n for n, _ in reference.named_modules() if n.endswith(tuple(TARGETS))]
    assert sorted(estimate) == sorted(names) and len(names) == 4
    for name in names:
        expected = reference.get_submodule(name).weight.grad.numpy()
        np.testing.assert_allclose(estimate[name], expected, rtol=1e-5, atol=1e-7)
        assert np.abs(expected).max() > 0


def test_lorasb_from_a_gradient_estimate_equals_peft_lora_export():
    """gradient → SVD init → LoRA-SB model; its peft export gives the same logits through peft."""
    base = _bert()
    plain = copy.deepcopy(base)
    grads = gradient_estimate(base, _batches(), TARGETS, _loss)
    frozen, initial = lorasb_init_states(grads, RANK)
    model = inject_lorasb(base, TARGETS, RANK, 2.0, lorasb_factors(frozen, initial), modules_to_save=["classifier"])
    rng = np.random.default_rng(3)
    trained = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in lorasb_state(model).items()}
    load_lorasb_state(model, trained)
    ids = torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 8, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(expected, plain(input_ids=ids).logits, atol=1e-3)
    for alpha in (8, 2):  # peft scale α/r equal to and different from LoRA-SB's s
        peft_model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=RANK, lora_alpha=alpha, target_modules=TARGETS,
                                                                       task_type="SEQ_CLS"))
        load_adapter_state(peft_model, to_peft_lora(frozen, trained, 2.0, alpha / RANK, prefix="base_model.model."))
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
