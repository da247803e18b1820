"""The ``fedlora`` command: every subcommand has --help, and ``fedlora run`` refuses bad input with one line,
before any Flower, SuperLink or Ray process starts (how long that takes is not a test's business: it is mostly
importing torch and transformers for the memory estimate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from fedlora.cli import DELEGATED, main
from fedlora.config import ConfigError
from fedlora.runtime.preflight import PreflightError, parse_value, preflight, round_timeout_note
from fedlora.runtime.processes import marked_processes
from fedlora.run_config import load_config

#: a variable every process the launcher starts would inherit
TAG = "FEDLORA_TEST_CLI_TAG"


COMMANDS = ["run", "certs", "site", "clientapp-runner", "serverapp-runner", "register-sites"]


def test_fedlora_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "fedlora.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(f"    {command}" in out.stdout for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "fedlora.cli", command, "--help"], capture_output=True, text=True,
                         timeout=60)
    usage = "Usage: fedlora certs" if command == "certs" else f"usage: fedlora {command}"  # certs: the script's own
    assert out.returncode == 0 and usage in out.stdout, out.stderr


SEEN: list[list[str]] = []


def record(argv: list[str]) -> int:
    SEEN.append(argv)
    return 7


def test_a_delegated_command_gets_the_arguments_after_its_name(monkeypatch):
    monkeypatch.setitem(DELEGATED, "echo", (f"{__name__}:record", "record the arguments"))
    assert main(["echo", "a", "--b"]) == 7 and SEEN[-1] == ["a", "--b"]


def user_file(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bad_inputs(tmp):
    """(arguments, the fragment its one error line must hold) for each kind of bad input."""
    rows = [{"text": "a", "label": "food"}, {"text": "b", "label": "food"}, {"text": "c", "label": "weather"}]
    labelled = user_file(tmp / "labelled.jsonl", rows)
    one = tmp / "one-file"
    one.mkdir()
    user_file(one / "site-a.jsonl", rows[:2])
    return [
        (["lora.rnak=4"], "unknown config key 'lora.rnak': did you mean 'lora.rank'?"),
        (["lora.rank=0"], "config key 'lora.rank' = 0 is invalid: expected a number > 0"),
        (["strategy=fedsgd"], "config key 'strategy' = 'fedsgd' is invalid"),
        (["rank=4"], "unknown config key 'rank'"),
        (["num-server-rounds"], "override 'num-server-rounds' is invalid: expected key=value"),
        (["model.name=bert-base-uncased"], "no hub access: set HF_HUB_OFFLINE=0 or use a local path/embedded model"),
        (["model.name=minlm"], "did you mean 'minilm'?"),
        (["dataset.name=org/some-data", "dataset.task=classification"], "no hub access: set HF_HUB_OFFLINE=0"),
        ([f"dataset.name={tmp / 'missing.jsonl'}", "dataset.task=classification"], "is invalid: no such file"),
        ([f"dataset.name={labelled}", "dataset.task=classification", "dataset.labels=food,drink"],
         f"{labelled}: row 3, column 'label': label 'weather' is outside the run's label set ['food', 'drink']"),
        (["partition.kind=natural", "partition.column=site"],
         "config key 'partition.column' = 'site' is invalid: expected one of the dataset's columns"),
        ([f"dataset.client-files={one}"], "matches 1 data file(s); the run has 2 clients, one file each"),
        (["report-to=mlflow"], "config key 'report-to' = 'mlflow' is invalid"),
        ([f"resume-from={tmp / 'no-run'}"], "is invalid: no checkpoint at"),
        (["memory.limit-gb=0.01"], "the client model does not fit cpu: estimated"),
    ]


def launch(args: list[str], tmp, tag: str) -> subprocess.CompletedProcess:
    """``python -m fedlora.runtime.launch`` with ``args``, every process it starts marked with ``tag``."""
    env = {**os.environ, TAG: tag, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "empty-hf-home")}
    return subprocess.run([sys.executable, "-m", "fedlora.runtime.launch", "--num-supernodes", "2",
                          "--flwr-home", str(tmp / "flwr-home"), *args], env=env, capture_output=True, text=True,
                         timeout=120)


def test_each_bad_input_fails_with_one_line_and_starts_nothing(tmp_path):
    for i, (args, fragment) in enumerate(bad_inputs(tmp_path)):
        tag = uuid.uuid4().hex
        case = tmp_path / f"case-{i}"
        case.mkdir()
        out = launch(args, case, tag)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (args, out.stderr)
        assert len(lines) == 1 and lines[0].startswith("fedlora: error: ") and fragment in lines[0], (args, lines)
        assert "Traceback" not in out.stderr and out.stdout == "", (args, out.stdout)
        assert not (case / "flwr-home").exists(), f"{args}: a SuperLink home was created"
        assert marked_processes(TAG, tag) == [], f"{args}: a process of the launch is alive"


def test_debug_adds_the_traceback(tmp_path):
    out = launch(["--debug", "lora.rank=0"], tmp_path, uuid.uuid4().hex)
    assert out.returncode == 2 and "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "fedlora: error: config key 'lora.rank' = 0 is invalid: expected a number > 0"


def test_several_bad_keys_get_one_line_each():
    with pytest.raises(PreflightError) as err:
        preflight(["lora.rnak=4", "lr=-1", "dp.mode=central"], 2, 2)
    problems = err.value.problems
    assert len(problems) == 3
    assert all(key in line for key, line in zip(["'lora.rnak'", "'lr' = -1", "'dp.mode' = 'central'"], problems))


@pytest.mark.parametrize("raw, default, value", [
    ("4", 8, 4), ("1e-3", 0.005, 1e-3), ("true", False, True), ("tiny-bert", "minilm", "tiny-bert"),
    ("'tiny-bert'", "minilm", "tiny-bert"), ("8", "", "8"), ("4,8,16", "", "4,8,16"), ("0.5", "", "0.5"),
])
def test_command_line_values_are_typed_like_their_keys(raw, default, value):
    assert parse_value(raw, default) == value and type(parse_value(raw, default)) is type(value)


def test_the_plan_resolves_relative_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user_file(tmp_path / "mine.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)])
    plan = preflight(["dataset.name=mine.jsonl", "dataset.task=classification", "model.name=tiny-bert"], 2, 2)
    assert plan.overrides["dataset.name"] == str(tmp_path / "mine.jsonl")


@pytest.mark.parametrize("cores, cpus, clients, overrides, timeout", [
    (2, 2, 4, {}, 2400.0),                       # the default job here: four clients, one at a time
    (16, 2, 4, {}, None),                        # they all fit at once: the default stands
    (2, 2, 4, {"round-timeout": 100.0}, None),   # the user's value stands
])
def test_round_timeout_is_derived_from_how_many_clients_train_at_once(monkeypatch, cores, cpus, clients, overrides,
                                                                       timeout):
    monkeypatch.setattr("fedlora.runtime.preflight.available_cores", lambda: cores)
    cfg = load_config(overrides)
    derived, note = round_timeout_note(cfg, overrides, clients, cpus, None)
    assert derived.get("round-timeout") == (timeout or overrides.get("round-timeout"))
    assert "round-timeout" in note and f"{clients} client(s) per round" in note


def test_the_default_job_never_times_out_a_client_before_its_turn(monkeypatch):
    """make run: 4 clients, 2 cores, 2 per client: every client gets the default's 600 s of its own."""
    monkeypatch.setattr("fedlora.runtime.preflight.available_cores", lambda: 2)
    plan = preflight([], 4, 2)
    assert plan.cfg.round_timeout / 4 == load_config({}).round_timeout
    assert "set round-timeout=SECONDS" in plan.notes[-1]
    assert plan.notes[0].startswith("client memory estimate on cpu: ") and plan.notes[1].startswith("server memory")


def test_unknown_keys_suggest_the_closest_known_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rnak': did you mean 'lora\.rank'\?"):
        load_config({"lora.rnak": 4})
    with pytest.raises(ConfigError, match=r"unknown config key 'xyz': not a fedlora key"):
        load_config({"xyz": 1})
