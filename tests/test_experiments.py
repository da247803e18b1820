"""The experiment runner: a 2-cell tiny-bert grid end to end, resume by skipping, baselines, grid parsing."""

import csv
import json

import pytest

from experiments.grid import Cell, load_grid
from experiments.run import main
from experiments.sweep import expected_config, is_finished, run_dir_of

GRID = """
name = "tiny"
num-clients = 2
strategies = ["fedavg", "ffa"]
partitions = ["iid"]
privacy = ["none"]
seeds = [3]

[base]
"model.name" = "tiny-bert"
num-server-rounds = 1
local-steps = 2
batch-size = 4
"dataset.max-length" = 16
"dataset.eval-max-examples" = 16
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    grid_file = root / "tiny.toml"
    grid_file.write_text(GRID)
    out = root / "out"
    assert main([str(grid_file), "--out", str(out)]) == 0
    return grid_file, out


def test_sweep_writes_results_table_and_plots(sweep):
    _, out = sweep
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["strategy"], r["partition"], r["privacy"], r["seed"]) for r in rows] == [
        ("centralized", "pooled", "none", "3"), ("fedavg", "iid", "none", "3"), ("ffa", "iid", "none", "3"),
        ("local-only", "iid", "none", "3"),
    ]
    fed = {r["strategy"]: r for r in rows}
    assert 0 < int(fed["ffa"]["bytes_up"]) < int(fed["fedavg"]["bytes_up"])  # FFA uploads B only
    assert all(r["final"] != "" and float(r["wall_seconds"]) >= 0 for r in rows)
    table = (out / "results.md").read_text()
    assert "4/4 cells finished" in table and "| fedavg |" in table and "(n=1)" in table
    for name in ("metric_vs_round.png", "metric_vs_bytes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "epsilon_vs_round.png").exists()  # no private cells in this grid
    assert (out / "grid.toml").exists()


def test_every_cell_follows_the_run_directory_contract(sweep):
    grid_file, out = sweep
    grid = load_grid(grid_file)
    for cell in grid.cells():
        run_dir = run_dir_of(out, cell)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1]
        assert all({"round", "strategy", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down"} <= set(r) for r in records)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["metric"] == "eval_accuracy" and summary["final"] == records[-1]["eval_accuracy"]
        assert json.loads((run_dir / "config.json").read_text())["seed"] == 3


def test_baselines_train_and_report_metrics(sweep):
    _, out = sweep
    local = [json.loads(line) for line in (out / "runs/local-only__iid__none__s3/metrics.jsonl").read_text().splitlines()]
    assert len(local[1]["client_eval_accuracy"]) == 2  # one held-out score per client, averaged
    assert local[1]["eval_accuracy"] == pytest.approx(sum(local[1]["client_eval_accuracy"]) / 2)
    central = [json.loads(line) for line in (out / "runs/centralized__pooled__none__s3/metrics.jsonl").read_text().splitlines()]
    assert central[1]["train_loss"] is not None and central[1]["eval_loss"] != central[0]["eval_loss"]  # it trained
    assert central[1]["bytes_up"] == 0 and central[1]["num_clients"] == 1
    config = json.loads((out / "runs/centralized__pooled__none__s3/config.json").read_text())
    assert config["centralized-batch-size"] == 2 * 4  # as many examples per step as both clients together


def test_rerun_skips_finished_cells_and_reruns_changed_ones(sweep, capsys):
    grid_file, out = sweep
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert main([str(grid_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped: finished with the same config") == 4
    assert "4 skipped" in printed
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    changed = load_grid(grid_file)
    changed.base["local-steps"] = 3
    cell = Cell("fedavg", "iid", "none", 3)
    run_dir = run_dir_of(out, cell)
    assert not is_finished(run_dir, expected_config(changed, cell, run_dir))


def test_grid_cells_share_settings_and_private_seeds(tmp_path):
    grid_file = tmp_path / "g.toml"
    grid_file.write_text('strategies = ["fedavg", "flora"]\npartitions = ["iid", "dirichlet-0.1"]\n'
                         'privacy = ["none", "eps-3"]\nseeds = [0, 1]\nprivate-seeds = [0]\n')
    grid = load_grid(grid_file)
    cells = [c for c in grid.cells() if not c.is_baseline]
    assert len(cells) == 2 * 2 * 2 + 2 * 2 * 1
    private = grid.overrides(Cell("flora", "dirichlet-0.1", "eps-3", 0))
    assert private["dp.mode"] == "sample" and private["dp.target-epsilon"] == 3.0
    assert private["partition.kind"] == "dirichlet" and private["partition.alpha"] == 0.1
    a, b = (grid.overrides(Cell(s, "iid", "none", 1)) for s in ("fedavg", "flora"))
    assert {k: v for k, v in a.items() if k != "strategy"} == {k: v for k, v in b.items() if k != "strategy"}
    with pytest.raises(ValueError, match="dirichlet"):
        grid_file.write_text('partitions = ["skewed"]\n')
        load_grid(grid_file)
