"""Every registered strategy end to end (in-process Grid, real Messages): metrics, exactness, bytes, reproducibility."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file

from fedlora.adapters.lora import adapter_state
from fedlora.client.role import ClientRole
from fedlora.config import ConfigError
from fedlora.evaluation import evaluate_rows
from fedlora.models.loading import load_base_model
from fedlora.run_config import load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.server.strategy import ServerStrategy
from fedlora.strategies.registry import names, spec_of, strategies
from fedlora.strategies.traffic import array_name, payload_bytes
from fedlora.task import heldout_rows, load_task, server_model

TINY = {"num-server-rounds": 2, "local-steps": 3, "batch-size": 8, "dataset.max-length": 32,
        "dataset.eval-max-examples": 32, "lora.rank": 4}
MODELS = {"tiny-bert": "chatterbot-topics", "tiny-llama": "chatterbot-qa"}
NPY_HEADER = 128  # np.save header of these small arrays
MIXED = [n for n, s in strategies().items() if s.capabilities.heterogeneous_ranks]


def run(tmp_path, strategy, model="tiny-bert", nodes=2, **extra):
    out = tmp_path / f"{model}-{strategy}-{len(list(tmp_path.iterdir()))}"
    run_inprocess({**TINY, "strategy": strategy, "model.name": model, "dataset.name": MODELS[model],
                   "output-dir": str(out), **extra}, num_nodes=nodes)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """One tiny run per (strategy, model), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("shared-runs")
    done: dict[tuple[str, str], tuple] = {}

    def get(strategy, model="tiny-bert"):
        if (strategy, model) not in done:
            done[(strategy, model)] = run(root, strategy, model)
        return done[(strategy, model)]

    return get


def test_every_strategy_package_is_registered_with_both_parts():
    known = strategies()
    assert {"fedavg", "ffa", "flora", "lorafair", "fedsb"} <= set(known)
    for name, spec in known.items():
        assert issubclass(spec.server_class(), ServerStrategy), name
        assert isinstance(spec.client_role(), ClientRole), name
        assert spec.capabilities.linear or spec.capabilities.not_linear, name


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("strategy", names())
def test_strategy_runs_end_to_end(shared_runs, strategy, model):
    out, records = shared_runs(strategy, model)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_clients"] == 2 and np.isfinite(r["eval_loss"]) for r in records[1:])
    errors = [r["agg_error"] for r in records[1:]]
    assert all(np.isfinite(e) and e >= 0 for e in errors)
    if spec_of(strategy).capabilities.exact:
        assert max(errors) < 1e-5, f"{strategy} aggregates exactly"
    cfg = load_config({**TINY, "strategy": strategy, "model.name": model, "dataset.name": MODELS[model]})
    task = load_task(cfg)
    peft_model = PeftModel.from_pretrained(load_base_model(model, task.kind, task.num_labels), out / "final_adapter")
    assert any("lora_B" in name for name, _ in peft_model.named_parameters())
    again = evaluate_rows(peft_model, heldout_rows(cfg), task.kind, task.pad_id, 64, torch.device("cpu"))
    assert again["eval_loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-4), "the final adapter is the last global model"


@pytest.mark.parametrize("strategy", names())
def test_every_strategy_improves_over_round_0(tmp_path, strategy):
    """The embedded classification task: held-out loss after 4 short rounds is below the initial model's."""
    _, records = run(tmp_path, strategy, **{"num-server-rounds": 4, "local-steps": 5, "lr": 5e-3})
    assert records[-1]["eval_loss"] < records[0]["eval_loss"], [r["eval_loss"] for r in records]


def test_fedavg_is_inexact_once_clients_drift(shared_runs):
    _, records = shared_runs("fedavg")
    assert min(r["agg_error"] for r in records[1:]) > 1e-4, "FedIT's average of factors is inexact once clients' A differ"


def test_lorafair_correction_never_increases_the_residual(shared_runs):
    _, records = shared_runs("lorafair")
    assert all(r["residual_after"] <= r["residual_before"] for r in records[1:])


@pytest.mark.parametrize("strategy", names())
def test_same_seed_same_result(tmp_path, shared_runs, strategy):
    first, _ = shared_runs(strategy)
    second, _ = run(tmp_path, strategy)
    a = load_file(str(first / "final_adapter" / "adapter_model.safetensors"))
    b = load_file(str(second / "final_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("strategy", ["fedavg", "lorafair", "flora"])
def test_agg_error_cadence_skips_the_metric_and_nothing_else(tmp_path, shared_runs, strategy):
    """metrics.agg-error-every = 2: round 1 has no agg_error, round 2 has it, and the adapter is bit for bit the same."""
    every_round, _ = shared_runs(strategy)
    out, records = run(tmp_path, strategy, **{"metrics.agg-error-every": 2})
    assert "agg_error" not in records[1] and "agg_error" in records[2]
    a = load_file(str(every_round / "final_adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _flower_bytes(arrays: dict[str, tuple[int, ...]]) -> int:
    """Serialized bytes of arrays as Flower counts them: payload + npy header + the array's name."""
    return sum(payload_bytes(key, shape) + NPY_HEADER + len(array_name(key)) for key, shape in arrays.items())


@pytest.mark.parametrize("strategy", names())
def test_bytes_match_the_strategy_contract(shared_runs, strategy):
    """Measured bytes_up / bytes_down of every round equal the strategy's declared traffic × 2 clients, exactly."""
    _, records = shared_runs(strategy)
    cfg = load_config({**TINY, "model.name": "tiny-bert"})
    adapter = {k: tuple(v.shape) for k, v in adapter_state(server_model(cfg, "cpu")).items()}
    traffic = spec_of(strategy).traffic_formula()
    for record in records:
        for direction in ("up", "down"):
            expected = 2 * _flower_bytes(traffic(direction, record["round"], adapter, 2))
            assert record[f"bytes_{direction}"] == expected, (strategy, record["round"], direction)


def test_the_contracts_rank_the_uploads_as_the_papers_do():
    """Per module of a square d×d layer at rank r: Fed-SB's r² < FFA's r·d < FedIT's 2r·d."""
    d, r = 64, 4
    adapter = {"m.lora_A.weight": (r, d), "m.lora_B.weight": (d, r)}
    floats = {name: sum(int(np.prod(s)) for s in spec_of(name).traffic_formula()("up", 2, adapter, 2).values())
              for name in ("fedsb", "ffa", "fedavg")}
    assert floats == {"fedsb": r * r, "ffa": r * d, "fedavg": 2 * r * d}


@pytest.mark.parametrize("strategy", MIXED)
def test_mixed_ranks_are_aggregated_where_supported(tmp_path, strategy):
    _, records = run(tmp_path, strategy, **{"lora.client-ranks": "2,4"})
    assert all(r["num_clients"] == 2 and np.isfinite(r["agg_error"]) for r in records[1:])
    if spec_of(strategy).capabilities.exact:
        assert all(r["agg_error"] < 1e-5 for r in records[1:])


def test_flora_stacks_mixed_ranks_to_their_sum(tmp_path):
    _, records = run(tmp_path, "flora", **{"lora.client-ranks": "2,6"})
    assert all(r["stacked_rank"] == 8 for r in records[1:])


@pytest.mark.parametrize("strategy", [n for n in names() if n not in MIXED])
def test_mixed_ranks_refused_where_not_supported(strategy):
    with pytest.raises(ConfigError, match="'lora.client-ranks'.*'strategy'"):
        load_config({"strategy": strategy, "lora.client-ranks": "4,8"})


@pytest.mark.parametrize("strategy", [n for n in MIXED if spec_of(n).check is not None])
def test_client_ranks_above_the_global_rank_are_refused_where_the_global_rank_is_fixed(strategy):
    with pytest.raises(ConfigError, match=r"client ranks \[8\] exceed the global rank.*at least 8"):
        load_config({"strategy": strategy, "lora.rank": 4, "lora.client-ranks": "2,8"})


def test_uniform_weighting_is_selectable(tmp_path):
    _, records = run(tmp_path, "fedavg", weighting="uniform")
    assert records[-1]["num_clients"] == 2


def test_docs_tables_are_rendered_from_the_registry():
    from fedlora.strategies import table

    assert table.main(["--check"]) == 0, "run: python -m fedlora.strategies.table"
    sections = (table.PROJECT_DIR / "docs" / "strategies.md").read_text()
    assert all(f"## `{name}`" in sections for name in names()), "every strategy has its section in docs/strategies.md"
