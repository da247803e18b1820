"""Sample-level DP-SGD (fedlora.privacy.sample_dp) against a hand-written clip-and-average reference."""

import copy

import numpy as np
import pytest
import torch

from fedlora.adapters.lora import adapter_state, inject_lora, load_adapter_state, set_trainable
from fedlora.client.loop import train_steps
from fedlora.config import LoraConfig
from fedlora.data.tokenize import IGNORE, collate
from fedlora.losses import loss_per_example
from fedlora.models.loading import load_base_model
from fedlora.privacy.sample_dp import dp_train_steps
from fedlora.privacy.sampling import noise_generator, poisson_batches

CPU = torch.device("cpu")
TASKS = {"tiny-bert": "classification", "tiny-llama": "instruction"}
OPACUS_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")


def make_rows(task: str, n: int, seed: int) -> list[dict]:
    """Rows of different lengths; causal-LM rows have a masked prompt of varying length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 1000, (4 + (i * 3) % 7,), generator=g).tolist()
        if task == "classification":
            rows.append({"input_ids": ids, "label": i % 3})
        else:
            prompt = 1 + i % 3
            rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


def make_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny adapted model without dropout, with a random non-zero B so that every adapter tensor gets gradient.

    The exactness tests run in float64 (the losses still cast logits to float32), so that
    they measure the DP arithmetic rather than float32 round-off.
    """
    task = TASKS[name]
    model = inject_lora(load_base_model(name, task, 3), LoraConfig(rank=4), task, seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rng = np.random.default_rng(seed)
    state = {k: (rng.normal(0, 0.1, v.shape).astype(np.float32) if ".lora_B." in k else v)
             for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    set_trainable(model)
    return model.to(dtype), task


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_update(model, rows, indices, task, clip: float, expected_batch: float) -> dict[str, torch.Tensor]:
    """−(1/E) Σ_i g_i·min(1, C/(‖g_i‖+1e-6)), per-example gradients by autograd in float64 (SGD, lr = 1)."""
    ref = copy.deepcopy(model).to(torch.float64).train()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p for p in ref.parameters() if p.requires_grad]
    batch = collate([rows[i] for i in indices], pad_id=0)
    labels = batch.pop("labels")
    losses = loss_per_example(task, ref(**batch).logits, labels)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(indices)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return {n: -t / expected_batch for n, t in zip(names, total)}, norms


def per_example_norms(model, rows, task) -> list[float]:
    return reference_update(model, rows, list(range(len(rows))), task, 1e9, 1.0)[1]


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    diff = sum(((got[k].double() - want[k]) ** 2).sum() for k in want)
    return float(torch.sqrt(diff / sum((want[k] ** 2).sum() for k in want)))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_noise_free_step_equals_clip_and_average_reference_on_full_batch(name, mode):
    model, task = make_model(name, dtype=torch.float64)
    rows = make_rows(task, 8, seed=1)
    norms = per_example_norms(model, rows, task)
    clip = float(np.median(norms))  # some examples clipped, some not
    assert min(norms) < clip < max(norms)
    want, _ = reference_update(model, rows, list(range(len(rows))), task, clip, expected_batch=len(rows))
    before = trainable(model)
    result = dp_train_steps(model, rows, task, 0, sgd(1.0), steps=1, batch_size=len(rows), noise_multiplier=0.0,
                            max_grad_norm=clip, grad_sample_mode=mode, generator=torch.Generator().manual_seed(0),
                            device=CPU)
    got = {n: p - before[n] for n, p in trainable(model).items()}
    assert set(got) == set(want)
    assert relative_error(got, want) <= 1e-6
    assert result.sample_rate == 1.0 and result.steps == 1


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_poisson_step_divides_by_expected_not_actual_batch_size(name, mode):
    model, task = make_model(name, dtype=torch.float64)
    rows, batch_size = make_rows(task, 10, seed=2), 4
    seed = next(s for s in range(100) if len(_first_poisson_batch(s, 10, 0.4)) not in (0, batch_size))
    indices = _first_poisson_batch(seed, 10, 0.4)
    want, _ = reference_update(model, rows, indices, task, 0.5, expected_batch=batch_size)
    before = trainable(model)
    result = dp_train_steps(model, rows, task, 0, sgd(1.0), steps=1, batch_size=batch_size, noise_multiplier=0.0,
                            max_grad_norm=0.5, grad_sample_mode=mode, generator=torch.Generator().manual_seed(seed),
                            device=CPU)
    got = {n: p - before[n] for n, p in trainable(model).items()}
    assert relative_error(got, want) <= 1e-6
    assert result.sample_rate == pytest.approx(0.4)


def _first_poisson_batch(seed: int, n: int, q: float) -> list[int]:
    """The rows dp_train_steps draws for its first step: one draw seeds the noise, then the Poisson mask."""
    g = torch.Generator().manual_seed(seed)
    noise_generator(g, CPU)
    return next(poisson_batches(n, q, g))


def test_only_trainable_tensors_change_ffa_style_b_only():
    model, task = make_model("tiny-llama")
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_B." in n)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    dp_train_steps(model, make_rows(task, 8, 3), task, 0, sgd(0.5), steps=2, batch_size=4, noise_multiplier=1.0,
                   max_grad_norm=1.0, grad_sample_mode="hooks", generator=torch.Generator().manual_seed(0), device=CPU)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_adapter_moves_with_noise_and_noise_changes_the_update(mode):
    updates = []
    for sigma in (0.0, 1.0):
        model, task = make_model("tiny-bert")
        before = trainable(model)
        dp_train_steps(model, make_rows(task, 8, 4), task, 0, sgd(0.1), steps=1, batch_size=8, noise_multiplier=sigma,
                       max_grad_norm=1.0, grad_sample_mode=mode, generator=torch.Generator().manual_seed(0), device=CPU)
        updates.append({n: p - before[n] for n, p in trainable(model).items()})
        assert all(float(u.abs().max()) > 0 for u in updates[-1].values() if u.numel() > 0)
    assert any(not torch.allclose(updates[0][k], updates[1][k]) for k in updates[0])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_model_is_left_plain_and_reusable(mode):
    model, task = make_model("tiny-llama")
    rows = make_rows(task, 8, 5)
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    for _ in range(2):  # a second round on the same cached model must attach again cleanly
        dp_train_steps(model, rows, task, 0, sgd(0.1), steps=2, batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0,
                       grad_sample_mode=mode, generator=torch.Generator().manual_seed(0), device=CPU)
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks_before
    assert not any(hasattr(p, a) for p in model.parameters() for a in OPACUS_ATTRS)
    assert not any(hasattr(m, a) for m in model.modules() for a in ("activations", "max_batch_len",
                                                                     "autograd_grad_sample_hooks"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    train_steps(model, rows, task, 0, optimizer, 1, 4, torch.Generator().manual_seed(0), CPU)
    assert all(p.grad is not None for p in params)
    assert not any(hasattr(p, a) for p in model.parameters() for a in OPACUS_ATTRS)


def test_unchanged_adapter_after_first_step_is_a_clear_error():
    model, task = make_model("tiny-bert")
    with pytest.raises(RuntimeError, match="left the adapter unchanged"):
        dp_train_steps(model, make_rows(task, 8, 6), task, 0, sgd(0.0), steps=1, batch_size=8, noise_multiplier=0.0,
                       max_grad_norm=1.0, grad_sample_mode="hooks", generator=torch.Generator().manual_seed(0),
                       device=CPU)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_trainable_embedding_or_norm_is_refused():
    model, task = make_model("tiny-llama")
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="embeddings and norm layers frozen"):
        dp_train_steps(model, make_rows(task, 8, 7), task, 0, sgd(0.1), steps=1, batch_size=4, noise_multiplier=1.0,
                       max_grad_norm=1.0, grad_sample_mode="hooks", generator=torch.Generator().manual_seed(0),
                       device=CPU)


def test_empty_poisson_batch_is_a_noise_only_step():
    model, task = make_model("tiny-bert")
    rows = make_rows(task, 4, 8)
    seed = next(s for s in range(1000) if not _first_poisson_batch(s, 4, 0.25))
    before = trainable(model)
    result = dp_train_steps(model, rows, task, 0, sgd(1.0), steps=1, batch_size=1, noise_multiplier=1.0,
                            max_grad_norm=1.0, grad_sample_mode="hooks", generator=torch.Generator().manual_seed(seed),
                            device=CPU)
    assert np.isnan(result.mean_loss) and result.steps == 1
    assert any(not torch.equal(p, before[n]) for n, p in trainable(model).items())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_bf16_autocast_step_moves_the_float32_adapter(mode):
    model, task = make_model("tiny-llama")
    before = trainable(model)
    result = dp_train_steps(model, make_rows(task, 8, 9), task, 0, sgd(0.1), steps=1, batch_size=8,
                            noise_multiplier=0.5, max_grad_norm=1.0, grad_sample_mode=mode,
                            generator=torch.Generator().manual_seed(0), device=CPU, amp_dtype=torch.bfloat16)
    assert np.isfinite(result.mean_loss)
    after = trainable(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_fp16_autocast_is_refused():
    model, task = make_model("tiny-bert")
    with pytest.raises(ValueError, match="fp16"):
        dp_train_steps(model, make_rows(task, 8, 10), task, 0, sgd(0.1), steps=1, batch_size=4, noise_multiplier=1.0,
                       max_grad_norm=1.0, grad_sample_mode="hooks", generator=torch.Generator().manual_seed(0),
                       device=CPU, amp_dtype=torch.float16)
