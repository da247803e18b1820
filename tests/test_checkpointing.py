"""Gradient checkpointing: the same gradients with and without it, plain and under DP-SGD (reentrant, Opacus hooks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters.lora import adapter_state, inject_lora, load_adapter_state, set_trainable
from fedlora.adapters.state import LORA_B
from fedlora.config import LoraConfig
from fedlora.losses import batch_losses
from fedlora.models.checkpointing import checkpointing_on, set_gradient_checkpointing
from fedlora.models.loading import load_base_model
from fedlora.privacy.sample_dp import dp_train_steps
from fedlora.run_config import full_defaults, load_config
from fedlora.task import adapted_model

CPU = torch.device("cpu")
TASKS = {"tiny-bert": "classification", "tiny-llama": "instruction"}
#: float32 recomputation of the same layers in the same order: the gradients agree to rounding
TOLERANCE = 1e-5


def make_rows(task: str, n: int = 6, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(1000, 3000, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "label": i % 3} if task == "classification"
                    else {"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def make_model(name: str, checkpointing: bool):
    """A tiny adapted model (dropout left on: reentrant checkpointing replays the RNG), B ≠ 0 so A gets gradient too."""
    task = TASKS[name]
    model = inject_lora(load_base_model(name, task, 3), LoraConfig(rank=4), task, seed=0)
    load_adapter_state(model, {k: v + 0.05 if k.endswith(LORA_B) else v for k, v in model.initial_state.items()})
    params = set_trainable(model)
    set_gradient_checkpointing(model, checkpointing)
    return model, params, task


def relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    return float(num / np.sqrt(sum((a[k] ** 2).sum() for k in a)))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        model, params, task = make_model(name, checkpointing)
        model.train()
        torch.manual_seed(0)
        batch_losses(model, make_rows(task), task, 0, CPU, None).mean().backward()
        grads.append({str(i): p.grad.numpy().copy() for i, p in enumerate(params)})
    assert relative_difference(*grads) <= TOLERANCE


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_checkpointing_gives_the_same_dp_sgd_step(name, mode):
    """One noise-free DP-SGD step on the full batch with clipping active: per-sample gradients see each layer once."""
    updates = []
    for checkpointing in (False, True):
        model, _, task = make_model(name, checkpointing)
        before = adapter_state(model)
        torch.manual_seed(0)
        dp_train_steps(model, make_rows(task), task, 0, lambda ps: torch.optim.SGD(ps, lr=1.0), steps=1, batch_size=6,
                       noise_multiplier=0.0, max_grad_norm=0.01, grad_sample_mode=mode,
                       generator=torch.Generator().manual_seed(1), device=CPU)
        updates.append({k: v - before[k] for k, v in adapter_state(model).items()})
    assert max(np.abs(v).max() for v in updates[0].values()) > 0, "the step moved the adapter"
    assert relative_difference(*updates) <= TOLERANCE


def test_checkpointing_recomputes_every_layer_in_the_backward_pass():
    model, _, task = make_model("tiny-llama", checkpointing=True)
    layers = model.get_base_model().model.layers
    calls = []  # a module inside each layer (transformers checkpoints a layer's forward, not its hooks)
    handles = [layer.mlp.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled())) for layer in layers]
    model.train()
    batch_losses(model, make_rows(task), task, 0, CPU, None).mean().backward()
    for handle in handles:
        handle.remove()
    assert calls == [False] * len(layers) + [True] * len(layers), "a no-grad forward, then one recomputation per layer"


def test_dp_refuses_non_reentrant_checkpointing():
    model, _, task = make_model("tiny-llama", checkpointing=False)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="reentrant gradient checkpointing"):
        dp_train_steps(model, make_rows(task), task, 0, lambda ps: torch.optim.SGD(ps, lr=1.0), steps=1, batch_size=6,
                       noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks",
                       generator=torch.Generator().manual_seed(1), device=CPU)


def test_the_config_key_turns_checkpointing_on_and_off_on_the_resident_model():
    flat = {**full_defaults(), "model.name": "tiny-bert"}
    on = adapted_model(load_config({**flat, "model.gradient-checkpointing": True}), "cpu")
    assert checkpointing_on(on)
    off = adapted_model(load_config(flat), "cpu")
    assert off is on and not checkpointing_on(off), "the same resident model, checkpointing as its run says"
