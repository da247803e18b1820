"""Smoke tests for the benchmark suites: each runs in a tiny mode so the scripts do not rot (no timings checked)."""

from __future__ import annotations

import pytest

from benchmarks import __main__ as entry
from benchmarks import aggregation, bytes_per_round, dp_overhead, framework_overhead, scale

TINY_JOB = ["--model", "tiny-bert", "--rounds", "2", "--local-steps", "1", "--batch-size", "4"]


def test_entry_point_lists_suites_on_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.main(["no-such-suite"]) == 2
    assert "aggregation" in capsys.readouterr().err


def test_aggregation_tiny_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    aggregation.main(["--layers", "2", "--hidden", "32", "--intermediate", "64", "--clients", "3", "--rank", "4"])
    out = capsys.readouterr().out
    assert "merge_into_base" in out and "aggregate_lorafair" in out and "naive average" in out


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


def test_throughput_table_reports_tokens_per_second() -> None:
    results = [dp_overhead.Measurement("minilm", "none", 0.5, 100.0), dp_overhead.Measurement("minilm", "hooks", 1.0, 110.0)]
    table = dp_overhead.table(results)
    assert "| minilm | non-DP | 4096 | 0.500 | 1.00 |" in table and "| minilm | DP hooks | 2048 |" in table
