"""The grid runner end to end on tiny-bert: lr sweep, equal-upload variant, baselines, test split, resume, stale cells."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedlora.experiments.baselines import run_baseline
from fedlora.experiments.cells import (
    FINISHED, MISSING, STALE, cell_status, drop_unmatched_summaries, expected_config, run_dir_of,
)
from fedlora.experiments.cells import main as cells_main
from fedlora.experiments.grid import Cell, GridError, load_grid
from fedlora.experiments.lr_sweep import SweepScore, choose_lr
from fedlora.experiments.run import main
from fedlora.experiments.sweep import Plan, Waiting
from fedlora.experiments.variants import matching_rank
from fedlora.run_config import full_defaults, load_config
from fedlora.server.rundir import TEST_FILE, RunDirectory
from fedlora.strategies.registry import spec_of

GRID = """
name = "tiny"
num-clients = 2

[base]
"model.name" = "tiny-bert"
num-server-rounds = 1
local-steps = 2
batch-size = 4
"dataset.max-length" = 16
"dataset.eval-max-examples" = 16
"dataset.test-fraction" = 0.2

[[study]]
name = "s"
strategies = ["fedavg"]
equal-upload = ["fedsb"]
partitions = ["iid"]
seeds = [3, 4]
baselines = ["centralized"]
[study.lr-sweep]
values = [0.001, 0.02]
seeds = [100]
"""
VARIANT = "fedsb@fedavg-upload"
GRIDS = Path(__file__).resolve().parents[1] / "experiments" / "grids"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    grid_file = root / "tiny.toml"
    grid_file.write_text(GRID)
    out = root / "out"
    assert main([str(grid_file), "--out", str(out)]) == 0
    return grid_file, out


def read(path: Path):
    return json.loads(path.read_text())


def test_sweep_writes_results_report_and_plots(sweep):
    _, out = sweep
    rows = list(csv.DictReader(open(out / "results.csv")))
    roles = sorted((r["role"], r["method"]) for r in rows)
    assert roles.count(("sweep", "fedavg")) == 2 and roles.count(("sweep", "centralized")) == 2
    assert roles.count(("main", VARIANT)) == 2 and roles.count(("baseline", "centralized")) == 2 and len(rows) == 12
    assert all(r["stale"] == "False" for r in rows)
    assert all((r["test_accuracy"] == "") == (r["role"] == "sweep") for r in rows)  # the sweep never scores the test
    report = (out / "report.md").read_text()
    for needle in ("### iid / none", "Δ vs fedavg [95% CI]", "majority class", "centralized (no DP)", VARIANT, "0 (reference)", "(chosen in bold)", "Every result was produced"):
        assert needle in report, needle
    for name in ("s-val_metric_vs_round.png", "s-val_loss_vs_round.png", "s-agg_error_vs_round.png",
                 "s-test_vs_bytes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "grid.toml").exists()


def test_main_cells_use_the_lr_their_sweep_chose_on_validation(sweep):
    grid_file, out = sweep
    grid = load_grid(grid_file)
    for method in ("fedavg", VARIANT, "centralized"):
        partition = "pooled" if method == "centralized" else "iid"
        scores = {}
        for lr in (0.001, 0.02):
            summary = read(run_dir_of(out, Cell("s", method, partition, "none", 100, lr)) / "summary.json")
            scores[lr] = [SweepScore(summary["final"], summary["final_eval_loss"])]
        chosen = choose_lr(scores, higher_is_better=True).lr
        for seed in grid.study("s").seeds:
            main_dir = run_dir_of(out, Cell("s", method, partition, "none", seed))
            assert read(main_dir / "config.json")["lr"] == chosen
            assert read(main_dir / "cell.json")["lr_choice"]["lr"] == chosen


def test_the_variant_uploads_what_the_reference_uploads(sweep):
    _, out = sweep
    fedavg, variant = (run_dir_of(out, Cell("s", m, "iid", "none", 3)) for m in ("fedavg", VARIANT))
    config = read(variant / "config.json")
    assert config["strategy"] == "fedsb" and config["lora.rank"] > 8
    assert config["lora.alpha"] / config["lora.rank"] == read(fedavg / "config.json")["lora.alpha"] / 8
    up = [read_rounds(d)[1]["bytes_up"] for d in (fedavg, variant)]
    assert abs(up[1] - up[0]) / up[0] < 0.1  # equal values; Fed-SB frames one array per module, FedAvg two
    assert read(variant / "cell.json")["variant"]["lora.rank"] == config["lora.rank"]


def read_rounds(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_baselines_train_and_score_the_test_split(sweep, tmp_path):
    grid_file, out = sweep
    grid = load_grid(grid_file)
    cell = Cell("s", "local-only", "iid", "none", 3)
    overrides = {**grid.overrides(cell, lr=0.01), "output-dir": str(tmp_path)}
    config = expected_config(cell, overrides, grid.num_clients)
    run_baseline("local-only", load_config({**full_defaults(), **overrides}), grid.num_clients, tmp_path, config)
    records = read_rounds(tmp_path)
    assert len(records[1]["client_eval_accuracy"]) == 2
    assert records[1]["eval_accuracy"] == pytest.approx(sum(records[1]["client_eval_accuracy"]) / 2)
    with np.load(tmp_path / "test_predictions.npz") as data:  # the mean over both clients' models, per example
        assert set(np.unique(data["correct"])) <= {0.0, 0.5, 1.0} and (data["prediction"] == -1).all()
    central = run_dir_of(out, Cell("s", "centralized", "pooled", "none", 3))
    records = read_rounds(central)
    assert records[1]["train_loss"] is not None and records[1]["eval_loss"] != records[0]["eval_loss"]
    assert read(central / "config.json")["centralized-batch-size"] == 2 * 4
    assert read(central / "summary.json")["test_examples"] > 0


def test_rerun_skips_and_stale_results_are_rerun_or_marked(sweep, capsys):
    grid_file, out = sweep
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}
    assert main([str(grid_file), "--out", str(out)]) == 0
    assert "12 skipped" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}

    plan = Plan(load_grid(grid_file), out)
    cell = Cell("s", "fedavg", "iid", "none", 4)
    summary_file = run_dir_of(out, cell) / "summary.json"
    summary = read(summary_file)
    summary_file.write_text(json.dumps({**summary, "code_version": "0123456789abcdef"}))
    assert cell_status(run_dir_of(out, cell), plan.config(cell)) == STALE
    changed = load_grid(grid_file)
    changed.base["local-steps"] = 3
    sweep_cell = Cell("s", "fedavg", "iid", "none", 100, 0.001)
    assert cell_status(run_dir_of(out, sweep_cell), Plan(changed, out).config(sweep_cell)) == MISSING
    with pytest.raises(Waiting, match="lr sweep needs"):  # a main cell waits for its sweep under the new config
        Plan(changed, out).config(cell)

    assert main([str(grid_file), "--out", str(out), "--status"]) == 0
    printed = capsys.readouterr().out
    assert "(s: fedavg, iid, none, seed 4) stale" in printed
    assert "1 finished cell(s) came from other code (0123456789abcdef (1))" in printed and "will be rerun" in printed
    assert main([str(grid_file), "--out", str(out), "--reuse-stale"]) == 0
    printed = capsys.readouterr().out
    assert "1 reused stale" in printed and "11 skipped" in printed and "they are reused, marked †" in printed
    assert "**1 of 12 results are stale (†)**" in (out / "report.md").read_text()
    assert "fedavg †" in (out / "report.md").read_text()
    assert main([str(grid_file), "--out", str(out), "--workers", "2"]) == 0  # the stale cell reruns in a worker process
    assert "1 cells run" in capsys.readouterr().out
    assert cell_status(run_dir_of(out, cell), plan.config(cell)) == FINISHED


def test_an_earlier_result_never_counts_for_a_rerun_that_did_not_finish(sweep, tmp_path):
    grid_file, out = sweep
    plan, cell = Plan(load_grid(grid_file), out), Cell("s", "fedavg", "iid", "none", 3)
    run_dir = tmp_path / "cell"
    shutil.copytree(run_dir_of(out, cell), run_dir)
    config = plan.config(cell)
    assert cell_status(run_dir, config) == FINISHED
    RunDirectory.create(load_config({**full_defaults(), "lr": 0.5}), run_dir)  # a rerun under another config starts
    assert not (run_dir / "summary.json").exists() and not (run_dir / TEST_FILE).exists()
    assert cell_status(run_dir, load_config({**full_defaults(), "lr": 0.5}).to_flat()) == MISSING
    # what code that did not clear the directory left: the new config and round 0, beside the old summary
    shutil.copy(run_dir_of(out, cell) / "summary.json", run_dir / "summary.json")
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 0, "eval_accuracy": 0.1}) + "\n")
    assert cell_status(run_dir, config) == MISSING
    assert drop_unmatched_summaries(tmp_path) == [run_dir] and not (run_dir / "summary.json").exists()
    assert drop_unmatched_summaries(out) == []  # the sweep's own cells are untouched
    with pytest.raises(SystemExit) as exited:
        cells_main([str(tmp_path / "absent")])
    assert exited.value.code == 2


def test_grid_files_both_forms_and_their_errors(tmp_path):
    for grid_file in sorted(GRIDS.glob("*.toml")):
        grid = load_grid(grid_file)
        assert grid.cells() and all(s.methods for s in grid.studies), grid_file
    legacy = load_grid(GRIDS / "minilm-default.toml")
    assert [s.name for s in legacy.studies] == [""]
    assert run_dir_of(Path("o"), legacy.cells()[0]) == Path("o/runs/centralized__pooled__none__s0")

    def fails(text, match):
        grid_file = tmp_path / "g.toml"
        grid_file.write_text(text)
        with pytest.raises(GridError, match=match):
            load_grid(grid_file)

    fails('partitions = ["skewed"]\n', "dirichlet")
    fails('[[study]]\nname = "a"\nseeds = [0]\n[study.lr-sweep]\nvalues = [0.01]\nseeds = [0]\n', "overlap")
    fails('[[study]]\nprivacy = ["none", "eps-3"]\n[study.lr-sweep]\nvalues = [0.01]\nprivacy = ["none"]\n',
          r"no level for the study's \['private'\]")
    fails('[[study]]\nbaselines = true\nprivacy = ["eps-3"]\n[study.lr-sweep]\nvalues = [0.01]\n', "non-private")
    fails('seeds = [0]\n[[study]]\nname = "a"\n', "go inside each study")
    fails('[[study]]\nequal-upload = ["nope"]\n', "equal-upload")
    fails('[[study]]\nstrategies = ["fedavg"]\nprivate-methods = ["ffa"]\n', "private-methods")
    fails('[[study]\n', "not valid TOML")


def test_a_bad_grid_file_is_one_line_and_exit_2(tmp_path, capsys):
    grid_file = tmp_path / "g.toml"
    grid_file.write_text('[[study]]\nseeds = [0]\n[study.lr-sweep]\nvalues = [0.01]\nseeds = [0]\n')
    for extra in ([], ["--status"]):
        assert main([str(grid_file), "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "overlap the main seeds" in err and "Traceback" not in err
    assert main([str(tmp_path / "absent.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "absent.toml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cells_of_a_study_share_settings_and_privacy_levels(tmp_path):
    grid_file = tmp_path / "g.toml"
    grid_file.write_text('[[study]]\nname = "dp"\nstrategies = ["fedavg", "ffa", "flora"]\n'
                         'partitions = ["dirichlet-0.3", "iid"]\nprivacy = ["none", "eps-3"]\nseeds = [0, 1]\n'
                         'private-seeds = [0]\nprivate-partitions = ["iid"]\nprivate-methods = ["fedavg", "ffa"]\n'
                         'baselines = ["centralized"]\n'
                         '[study.lr-sweep]\nvalues = [0.01, 0.1]\nprivacy = ["none", "eps-1"]\n')
    grid = load_grid(grid_file)
    study = grid.study("dp")
    main_cells = [c for c in study.main_cells() if not c.is_baseline]
    assert len(main_cells) == 3 * 2 * 2 + 2 * 1 * 1  # private: 2 methods × 1 partition × 1 seed
    assert {(c.method, c.partition) for c in main_cells if c.privacy != "none"} == {("fedavg", "iid"), ("ffa", "iid")}
    sweep = study.sweep_cells()
    assert len(sweep) == (3 * 2 + 2) + 2 * 2  # none: methods + centralized; eps-1: the private methods only
    assert {c.partition for c in sweep if c.privacy == "eps-1"} == {"iid"}
    assert {c.partition for c in sweep if c.privacy == "none"} == {"dirichlet-0.3", "pooled"}
    assert grid.overrides(sweep[0])["dataset.score-test"] is False
    assert study.lr_sweep.level_for("eps-3") == "eps-1" and study.lr_sweep.level_for("none") == "none"
    private = grid.overrides(Cell("dp", "ffa", "dirichlet-0.3", "eps-3", 0), lr=0.1)
    assert private["dp.mode"] == "sample" and private["dp.target-epsilon"] == 3.0 and private["lr"] == 0.1
    assert private["partition.kind"] == "dirichlet" and private["partition.alpha"] == 0.3
    a, b = (grid.overrides(Cell("dp", s, "dirichlet-0.3", "none", 1)) for s in ("fedavg", "ffa"))
    assert {k: v for k, v in a.items() if k != "strategy"} == {k: v for k, v in b.items() if k != "strategy"}


def test_choose_lr_on_validation_scores():
    scores = {0.01: [SweepScore(0.5, 1.0), SweepScore(0.7, 0.9)], 0.1: [SweepScore(0.6, 0.8), SweepScore(0.6, 0.7)],
              1.0: [SweepScore(None, None), SweepScore(0.9, 0.1)]}
    choice = choose_lr(scores, higher_is_better=True)
    assert choice.lr == 0.1 and choice.means[0.01] == pytest.approx(0.6) and choice.means[1.0] == -math.inf
    assert choose_lr({0.01: [SweepScore(0.6, 0.9)], 0.1: [SweepScore(0.6, 0.8)]}, True).lr == 0.1  # tie: lower loss
    assert choose_lr({0.01: [SweepScore(9.0, 2.2)], 0.1: [SweepScore(12.0, 2.5)]}, False).lr == 0.01  # perplexity
    with pytest.raises(ValueError, match="at least one"):
        choose_lr({0.01: []}, True)


def test_matching_rank_equalises_the_upload_per_round():
    d, k, r = 64, 64, 4
    adapter = {f"l{i}.lora_A.weight": (r, k) for i in range(3)} | {f"l{i}.lora_B.weight": (d, r) for i in range(3)}
    adapter["classifier.weight"] = (5, d)
    traffic = {name: spec_of(name).traffic_formula() for name in ("fedavg", "ffa", "fedsb")}
    assert matching_rank(traffic["ffa"], traffic["fedavg"], adapter, 3, 2) == 2 * r
    assert matching_rank(traffic["fedsb"], traffic["fedavg"], adapter, 3, 2) == round(math.sqrt(r * (d + k)))
    assert matching_rank(traffic["fedavg"], traffic["fedavg"], adapter, 3, 2) == r
