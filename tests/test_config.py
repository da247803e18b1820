import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedlora.config import ConfigError, parse_config
from fedlora.run_config import full_defaults, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_are_the_config_defaults():
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flatten_dict(raw) == full_defaults()
    assert load_config(flatten_dict(raw)) == load_config({})


def test_overrides_are_typed():
    cfg = load_config({"lora.rank": 4, "lr": 1, "model.name": "tiny-bert", "partition.kind": "dirichlet"})
    assert cfg.lora.rank == 4 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.model.name == "tiny-bert" and cfg.partition.kind == "dirichlet"


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"lora.rnak": 4}, ["'lora.rnak'", "known keys"]),
        ({"strategy": "fedsgd"}, ["'strategy'", "'fedsgd'", "'fedavg'"]),
        ({"model.name": "no/such/model"}, ["'model.name'", "'no/such/model'", "'tiny-bert'", "org/name"]),
        ({"dataset.name": "nope"}, ["'dataset.name'", "'nope'", "'chatterbot-topics'"]),
        ({"lora.rank": 0}, ["'lora.rank'", "0", "> 0"]),
        ({"lora.rank": 2.5}, ["'lora.rank'", "2.5", "integer"]),
        ({"fraction-train": 1.5}, ["'fraction-train'", "1.5", "(0, 1]"]),
        ({"fraction-train": 0.0}, ["'fraction-train'", "(0, 1]"]),
        ({"partition.kind": "shards"}, ["'partition.kind'", "'shards'", "'dirichlet'"]),
        ({"partition.alpha": -1.0}, ["'partition.alpha'", "-1.0"]),
        ({"model.name": 3}, ["'model.name'", "string"]),
        ({"device": "tpu"}, ["'device'", "'tpu'", "cuda:N"]),
        ({"dp.mode": "central"}, ["'dp.mode'", "'central'", "'sample'"]),
        ({"dataset.name": "chatterbot-qa", "dataset.task": "classification"}, ["'dataset.task'", "'instruction'"]),
        ({"dataset.name": "org/data"}, ["'dataset.task'", "'auto'"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_hub_and_local_names_are_accepted(tmp_path):
    data = tmp_path / "site.jsonl"
    data.write_text('{"text": "hi", "label": "a"}\n')
    cfg = load_config({"model.name": "HuggingFaceTB/SmolLM2-135M", "dataset.name": str(data), "dataset.task": "classification"})
    assert cfg.dataset.name == str(data)


def test_encoder_cannot_be_instruction_tuned():
    from fedlora.task import load_task

    with pytest.raises(ConfigError, match="encoder"):
        load_task(load_config({"model.name": "tiny-bert", "dataset.name": "chatterbot-qa"}))


def test_config_module_parses_only_the_sections_it_is_given():
    """fedlora.config knows no registry: a strategy's section is unknown unless its dataclass is passed in."""
    from fedlora.strategies.lorafair import LoraFairOptions

    with pytest.raises(ConfigError, match="'lorafair.lambda'"):
        parse_config({"lorafair.lambda": 0.5})
    cfg = parse_config({"lorafair.lambda": 0.5}, {"lorafair": LoraFairOptions})
    assert cfg.section("lorafair").lambda_ == 0.5 and cfg.to_flat()["lorafair.lambda"] == 0.5
    with pytest.raises(ConfigError, match="'lorafair.lambda' = -1.0.*>= 0"):
        parse_config({"lorafair.lambda": -1.0}, {"lorafair": LoraFairOptions})
