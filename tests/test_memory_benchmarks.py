"""Smoke tests of the memory benchmark and the GPU check in tiny CPU modes, so they do not rot (no timings checked)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import client_memory, gpu_check


def test_client_memory_measures_a_variant_of_switches_on_tiny_llama():
    measured = client_memory.measure("tiny-llama", "bf16+ckpt+dp", batch=2, length=8, steps=1, rounds=1, warmup=0,
                                     device_name="cpu")
    assert measured.seconds_per_step > 0 and measured.estimate_mib > 0


def test_client_memory_refuses_unknown_switches():
    with pytest.raises(ValueError, match="unknown switch 'fp64'"):
        client_memory.run_config("tiny-llama", "fp64+ckpt", 2, 8, "cpu")


def test_client_memory_table_and_verdict_compare_with_fp32():
    results = [client_memory.Measurement("fp32", 1.0, 1000.0, 900.0),
               client_memory.Measurement("bf16+ckpt", 1.4, 450.0, 400.0)]
    assert "| bf16+ckpt | 1.400 | 1.40x | 450 | 0.45x | 400 |" in client_memory.table(results)
    assert client_memory.verdict(results).endswith("0.45x memory, 1.40x time — met")
    assert client_memory.verdict(results[:1]) is None


def test_gpu_check_runs_one_variant_end_to_end_on_tiny_llama():
    args = argparse.Namespace(model="tiny-llama", batch=2, length=8, rounds=1, steps=2, measure_steps=1, lr=0.05,
                              eval_examples=4, device="cpu")
    result = gpu_check.one("nf4+dp", args)
    assert result["variant"] == "nf4+dp" and len(result["eval_loss"]) == 2 and result["epsilon"] > 0
    assert "| nf4+dp |" in gpu_check.table([result])
