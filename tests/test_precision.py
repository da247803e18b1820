"""Base precision and quantization: bf16, 4-bit and 8-bit bases train, adapters stay float32, bad requests fail early."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedlora.adapters.initial import seeded_adapter_state
from fedlora.adapters.lora import inject_lora, load_adapter_state, set_trainable
from fedlora.adapters.state import LORA_B
from fedlora.config import ConfigError, LoraConfig
from fedlora.models import precision
from fedlora.models.loading import load_base_model
from fedlora.models.precision import BaseSpec
from fedlora.run_config import full_defaults, load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.task import adapted_model

#: a causal-LM job small enough for seconds per run; SGD, so an update is proportional to its gradient
JOB = {"model.name": "tiny-llama", "dataset.name": "chatterbot-qa", "num-server-rounds": 2, "local-steps": 4,
       "batch-size": 4, "dataset.max-length": 24, "dataset.eval-max-examples": 32, "optimizer": "sgd", "lr": 1.0}
#: relative L2 difference allowed between the adapter updates of a bf16-base and an fp32-base run (measured: 0.6 %)
BF16_TOLERANCE = 0.03


def final_adapter(run_dir) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_bf16_base_trains_and_matches_the_fp32_base_within_tolerance(tmp_path):
    adapters = {}
    for dtype in ("fp32", "bf16"):
        run_inprocess({**JOB, "model.dtype": dtype, "output-dir": str(tmp_path / dtype)}, num_nodes=2)
        losses = [r["eval_loss"] for r in records(tmp_path / dtype)]
        assert losses[-1] < losses[0], f"{dtype}: held-out loss did not fall: {losses}"
        adapters[dtype] = final_adapter(tmp_path / dtype)
    initial = seeded_adapter_state({k: v.shape for k, v in adapters["fp32"].items()}, 42)
    update = np.sqrt(sum(((adapters["fp32"][k] - initial[k]) ** 2).sum() for k in initial))
    difference = np.sqrt(sum(((adapters["fp32"][k] - adapters["bf16"][k]) ** 2).sum() for k in initial))
    assert update > 0.1, "the fp32 run trained its adapter"
    assert difference / update <= BF16_TOLERANCE, f"bf16 base: adapter update differs by {difference / update:.2%}"


def test_a_bf16_base_keeps_adapters_their_gradients_and_the_head_in_float32():
    cfg = load_config({**full_defaults(), "model.name": "tiny-bert", "model.dtype": "bf16"})
    model = adapted_model(cfg, "cpu")
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert any("modules_to_save" in n for n in params), "the classification head trains, in float32"
    assert model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
    out = model(input_ids=torch.tensor([[101, 2000, 102]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    out.logits.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())


@pytest.mark.parametrize("kind, layer", [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)])
def test_a_quantized_base_trains_on_cpu(tmp_path, kind, layer):
    """bitsandbytes 0.50 runs 4-bit and 8-bit layers on CPU: the request trains (it is not refused)."""
    run_inprocess({**JOB, "model.quantization": kind, "output-dir": str(tmp_path / kind)}, num_nodes=2)
    losses = [r["eval_loss"] for r in records(tmp_path / kind)]
    assert losses[-1] < losses[0], f"{kind}: held-out loss did not fall: {losses}"
    model = adapted_model(load_config({**full_defaults(), **JOB, "model.quantization": kind}), "cpu")
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, layer)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert (tmp_path / kind / "final_adapter" / "adapter_model.safetensors").is_file()


def test_a_4bit_base_still_trains_after_it_evaluated_on_cpu():
    """bitsandbytes' CPU inference repacking would cut the adapters off their gradients: fedlora keeps it off."""
    rows = torch.tensor([[101, 2000, 2001, 2002, 102]])
    results = []
    for evaluate_first in (False, True):
        model = inject_lora(load_base_model("tiny-llama", "instruction", 0, BaseSpec(quantization="nf4")),
                            LoraConfig(rank=4), "instruction", seed=0)
        load_adapter_state(model, {k: v + 0.05 if k.endswith(LORA_B) else v for k, v in model.initial_state.items()})
        params = set_trainable(model)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=rows)
        model.train()
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        results.append((loss.item(), [p.grad for p in params]))
    (loss, grads), (loss_after_eval, grads_after_eval) = results
    assert loss_after_eval == pytest.approx(loss, abs=1e-6)
    assert all(g is not None for g in grads_after_eval), "no gradient reached the adapter after an evaluation"
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_after_eval))


def test_a_quantization_bitsandbytes_cannot_run_fails_at_start_saying_what_works(monkeypatch):
    def unsupported(self, x):
        raise NotImplementedError("no kernel for this device")

    precision.check_quantization.cache_clear()
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", unsupported)
    try:
        with pytest.raises(ConfigError) as err:
            precision.base_spec(load_config({"model.quantization": "nf4"}).model, torch.device("cpu"))
    finally:
        precision.check_quantization.cache_clear()
    message = str(err.value)
    assert "'model.quantization' = 'nf4' cannot run on cpu" in message and "no kernel for this device" in message
    assert "model.quantization = 'none'" in message and "model.dtype = 'bf16'" in message


def test_a_quantized_base_holds_its_linear_weights_in_4_bits():
    plain = load_base_model("tiny-llama", "instruction", 0)
    quantized = load_base_model("tiny-llama", "instruction", 0, BaseSpec(quantization="nf4"))
    plain_bytes = plain.model.layers[0].mlp.up_proj.weight.nbytes
    quantized_bytes = quantized.model.layers[0].mlp.up_proj.weight.nbytes
    assert quantized_bytes * 8 == plain_bytes, "4 bits per fp32 weight of 32 bits"
    assert quantized.lm_head.weight.dtype == torch.float32, "the output head is not quantized"


@pytest.mark.parametrize("overrides, fragments", [
    ({"dp.mode": "sample", "dp.noise-multiplier": 1.0, "model.dtype": "fp16"}, ["'model.dtype' = 'fp16'", "'bf16'"]),
    ({"model.device-map": "spread", "device": "cpu"}, ["'model.device-map' = 'spread'", "'device' = 'cpu'"]),
    ({"model.quantization": "q3"}, ["'model.quantization'", "'nf4'", "'int8'"]),
    ({"model.dtype": "fp8"}, ["'model.dtype'", "'bf16'"]),
])
def test_bad_precision_settings_name_the_keys(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert all(f in str(err.value) for f in fragments), str(err.value)


@pytest.mark.parametrize("strategy", ["flora", "fedex", "fedsb"])
def test_strategies_that_need_a_dense_base_refuse_a_quantized_one_at_config_time(strategy):
    with pytest.raises(ConfigError, match=f"'strategy' = '{strategy}' and 'model.quantization' = 'nf4'"):
        load_config({**full_defaults(), **JOB, "strategy": strategy, "model.quantization": "nf4"})


def test_fed_sb_trains_r_and_the_head_in_float32_on_a_bf16_base_with_checkpointing(tmp_path):
    from fedlora.strategies.fedsb import client as fedsb_client

    run_inprocess({**JOB, "strategy": "fedsb", "model.dtype": "bf16", "model.gradient-checkpointing": True,
                   "output-dir": str(tmp_path)})
    losses = [r["eval_loss"] for r in records(tmp_path)]
    assert losses[-1] < losses[0], "Fed-SB learns on a bf16 base"
    model = next(iter(fedsb_client._LORASB_MODELS.values()))  # the process's resident Fed-SB model
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad), "the base stays bf16"
