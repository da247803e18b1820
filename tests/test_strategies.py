"""Every strategy end to end (in-process Grid, real Messages): metrics, exactness, bytes, reproducibility."""

import json

import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file

from fedlora.config import ConfigError, parse_config
from fedlora.inprocess import run_inprocess
from fedlora.models.loading import load_base_model
from fedlora.task import load_task

STRATEGIES = ["fedavg", "ffa", "flora", "lorafair", "fedsb"]
TINY = {"num-server-rounds": 2, "local-steps": 3, "batch-size": 8, "dataset.max-length": 32,
        "dataset.eval-max-examples": 32, "lora.rank": 4}
MODELS = {"tiny-bert": "chatterbot-topics", "tiny-llama": "chatterbot-qa"}
NPY_HEADER = 128  # np.save header of these small float32 arrays


def run(tmp_path, strategy, model="tiny-bert", **extra):
    out = tmp_path / f"{model}-{strategy}-{len(list(tmp_path.iterdir()))}"
    run_inprocess({**TINY, "strategy": strategy, "model.name": model, "dataset.name": MODELS[model],
                   "output-dir": str(out), **extra}, num_nodes=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_runs_end_to_end(tmp_path, strategy, model):
    out, records = run(tmp_path, strategy, model)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_clients"] == 2 and np.isfinite(r["eval_loss"]) for r in records[1:])
    errors = [r["agg_error"] for r in records[1:]]
    if strategy == "fedavg":
        assert min(errors) > 1e-4, "FedIT's average of factors is inexact once clients' A differ"
    elif strategy == "lorafair":
        assert all(r["residual_after"] <= r["residual_before"] for r in records[1:])
    else:
        assert max(errors) < 1e-5, f"{strategy} aggregates exactly"
    task = load_task(parse_config({"model.name": model, "dataset.name": MODELS[model]}))
    peft_model = PeftModel.from_pretrained(load_base_model(model, task.kind, task.num_labels), out / "final_adapter")
    assert any("lora_B" in name for name, _ in peft_model.named_parameters())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_result(tmp_path, strategy):
    first, _ = run(tmp_path, strategy)
    second, _ = run(tmp_path, strategy)
    a = load_file(str(first / "final_adapter" / "adapter_model.safetensors"))
    b = load_file(str(second / "final_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _expected_bytes(arrays: dict[str, tuple[int, ...]]) -> int:
    """Serialized bytes of float32 arrays as Flower counts them: payload + npy header + key."""
    return sum(4 * int(np.prod(shape)) + NPY_HEADER + len(key) for key, shape in arrays.items())


def test_bytes_match_the_analytic_sizes(tmp_path):
    """Per client and round on tiny-bert (d = k = 32, r = 4, 4 modules, 12-way head):
    fedavg/lorafair r(d+k) per module both ways, ffa r·d up and down, fedsb r² up and down
    (plus B, A once), flora r(d+k) up and Σ_j r_j(d+k) per merge down."""
    d = k = 32
    r = TINY["lora.rank"]
    labels = len(load_task(parse_config({"model.name": "tiny-bert"})).data.labels)
    prefix = "base_model.model."
    modules = [f"{prefix}bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    head = {f"{prefix}classifier.weight": (labels, d), f"{prefix}classifier.bias": (labels,)}
    A = {f"{m}.lora_A.weight": (r, k) for m in modules}
    B = {f"{m}.lora_B.weight": (d, r) for m in modules}
    plain = [m[len(prefix):] for m in modules]
    plain_head = {key[len(prefix):]: shape for key, shape in head.items()}
    R = {f"{m}.lorasb_R.weight": (r, r) for m in plain}
    factors = {**{f"{m}.lorasb_B.weight": (d, r) for m in plain}, **{f"{m}.lorasb_A.weight": (r, k) for m in plain}}
    stack = {f"{m}.lora_A.weight": (2 * r, k) for m in modules} | {f"{m}.lora_B.weight": (d, 2 * r) for m in modules}
    per_client = {
        "fedavg": ([(_expected_bytes({**A, **B, **head}),) * 2] * 2),
        "lorafair": ([(_expected_bytes({**A, **B, **head}),) * 2] * 2),
        "ffa": ([(_expected_bytes({**B, **head}),) * 2] * 2),
        "fedsb": [(_expected_bytes({**R, **plain_head}), _expected_bytes({**R, **plain_head, **factors})),
                  (_expected_bytes({**R, **plain_head}), _expected_bytes({**R, **plain_head}))],
        "flora": [(_expected_bytes({**A, **B, **head}), _expected_bytes(head)),
                  (_expected_bytes({**A, **B, **head}), _expected_bytes({**head, **stack}))],
    }
    for strategy, rounds in per_client.items():
        _, records = run(tmp_path, strategy)
        for record, (up, down) in zip(records[1:], rounds):
            assert record["bytes_up"] == 2 * up, (strategy, record["round"])
            assert record["bytes_down"] == 2 * down, (strategy, record["round"])
    assert _expected_bytes(B) < _expected_bytes({**A, **B}) and _expected_bytes(R) < _expected_bytes(B)


def test_fedsb_counts_its_gradient_round_in_round_zero(tmp_path):
    _, records = run(tmp_path, "fedsb")
    d = k = 32
    assert records[0]["bytes_up"] >= 2 * 4 * (4 * d * k)  # 2 clients x 4 dense d×k gradients


def test_flora_aggregates_heterogeneous_ranks_exactly(tmp_path):
    _, records = run(tmp_path, "flora", **{"lora.client-ranks": "2,6"})
    assert all(r["agg_error"] < 1e-5 and r["stacked_rank"] == 8 for r in records[1:])


@pytest.mark.parametrize("strategy", ["fedavg", "ffa", "lorafair", "fedsb"])
def test_heterogeneous_ranks_refused_where_inexact(strategy):
    with pytest.raises(ConfigError, match="'lora.client-ranks'.*'strategy'"):
        parse_config({"strategy": strategy, "lora.client-ranks": "4,8"})


def test_uniform_weighting_is_selectable(tmp_path):
    _, records = run(tmp_path, "fedavg", weighting="uniform")
    assert records[-1]["num_clients"] == 2
