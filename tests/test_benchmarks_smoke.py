"""Smoke tests for the benchmark suites: each runs in a tiny mode so the scripts do not rot (no timings checked)."""

from __future__ import annotations

import pytest

from benchmarks import __main__ as entry
from benchmarks import bytes_per_round, client_step, framework_overhead, scale, server_round

TINY_JOB = ["--model", "tiny-bert", "--rounds", "2", "--local-steps", "1", "--batch-size", "4"]


def test_entry_point_lists_suites_on_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.main(["no-such-suite"]) == 2
    assert "server" in capsys.readouterr().err


def test_server_round_runs_every_strategy_on_small_replies(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(server_round, "D", 64)
    monkeypatch.setattr(server_round, "K_IN", 48)
    server_round.main(["--layers", "1", "--clients", "3", "--rank", "2", "--repeats", "1", "--no-growth"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "strategy" not in line]
    assert {row.split(" | ")[0].removeprefix("| ") for row in rows} >= {"fedavg", "ffa", "fedsb", "flora", "lorafair"}


def test_server_round_ratios_are_taken_within_each_round() -> None:
    # the machine slows down in round 2 for the denominator only, in round 3 for both: a ratio of medians says 3×
    assert server_round.paired_ratio([1.0, 3.0, 9.0], [1.0, 1.0, 9.0]) == 1.0
    assert server_round.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 2.0


def test_bytes_measured_minus_payload_is_framing_only(capsys: pytest.CaptureFixture[str]) -> None:
    bytes_per_round.main(["--models", "tiny-bert", "--strategies", "ffa"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-bert")]
    assert rows and all(int(r[7]) > 0 for r in rows)


def test_framework_overhead_in_process_only(capsys: pytest.CaptureFixture[str]) -> None:
    framework_overhead.main([*TINY_JOB, "--nodes", "2", "--no-flwr"])
    out = capsys.readouterr().out
    assert "| in-process |" in out and "| pure compute |" in out


def test_scale_few_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    scale.main([*TINY_JOB, "--nodes", "20", "--fraction", "0.1"])
    assert "20 virtual nodes" in capsys.readouterr().out


def test_client_step_table_compares_each_variant_with_its_baseline() -> None:
    results = [client_step.Measurement("minilm", "floor", 0.5, 100.0), client_step.Measurement("minilm", "fedlora", 0.55, 110.0),
               client_step.Measurement("minilm", "opacus", 1.0, 120.0), client_step.Measurement("minilm", "fedlora-dp", 1.1, 120.0)]
    table = client_step.table(results)
    assert "| minilm | floor | 4,096 | 0.500 |  | 100 |  |" in table
    assert "| minilm | fedlora | 3,724 | 0.550 | 1.10x vs floor | 110 | 1.10x |" in table
    assert "| minilm | fedlora-dp | 1,862 | 1.100 | 1.10x vs opacus | 120 | 1.00x |" in table


def test_client_step_runs_fedlora_and_the_floor_on_tiny_bert(monkeypatch) -> None:
    monkeypatch.setitem(client_step.MODELS, "tiny-bert", ("classification", 4, 8))
    for variant in ("floor", "fedlora", "opacus", "fedlora-dp"):
        measured = client_step.measure("tiny-bert", variant, steps=1, rounds=1, warmup=0, device_name="cpu")
        assert measured.seconds_per_step > 0
