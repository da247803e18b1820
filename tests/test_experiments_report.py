"""``fedlora report`` and the results-document check on synthetic results with known answers."""

import json

import numpy as np
import pytest

from fedlora.experiments.report import main
from fedlora.experiments.report.collect import load_results
from fedlora.experiments.report.compare import MAJORITY, compare
from fedlora.experiments.report.results_doc import DocError, Evaluator, check, render
from fedlora.server.rundir import RUNNING_CODE_VERSION
from fedlora.server.rundir import TEST_FILE

N, SEEDS = 400, (0, 1, 2)
#: correct examples per method: fedavg gets the first 200 right, ffa 20 more, flora 200 but others
CORRECT = {"fedavg": range(0, 200), "ffa": range(0, 220), "flora": range(100, 300)}


def write_run(run_dir, method, seed, correct, privacy="none", code_version=RUNNING_CODE_VERSION, baseline=None):
    """A finished run directory as the grid runner writes it, with per-example test results."""
    run_dir.mkdir(parents=True)
    config = {"strategy": method, "seed": seed, "partition.kind": "iid", "lr": 0.01, "lora.rank": 8,
              "dp.mode": "none" if privacy == "none" else "sample",
              "dp.target-epsilon": 0.0 if privacy == "none" else float(privacy.removeprefix("eps-"))}
    if baseline:
        config["baseline"] = baseline
    label = np.arange(N) % 4
    label[:10] = 0  # class 0 is the most frequent: the majority-class baseline predicts it
    hits = np.zeros(N, np.float32)
    hits[list(correct)] = 1.0
    prediction = np.where(hits == 1, label, (label + 1) % 4)
    np.savez(run_dir / TEST_FILE, correct=hits, loss=1.0 - hits.astype(np.float64), tokens=np.ones(N, np.int32),
             label=label.astype(np.int32), prediction=prediction.astype(np.int32), fingerprint=np.array("f" * 16),
             majority_label=np.array(0, np.int32))
    rounds = [{"round": 0, "bytes_up": 0, "bytes_down": 0, "eval_accuracy": 0.1, "eval_loss": 2.0},
              {"round": 1, "bytes_up": 2e6, "bytes_down": 4e6, "eval_accuracy": 0.4, "eval_loss": 1.5}]
    if privacy != "none":
        rounds[0]["epsilon_max"] = 0.7 if method == "fedsb" else 0.0
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary = {"metric": "eval_accuracy", "final": 0.4, "final_eval_loss": 1.5, "total_bytes_up": 2e6,
               "total_bytes_down": 4e6, "test_accuracy": float(hits.mean()), "code_version": code_version}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def results_dir(tmp_path):
    for seed in SEEDS:
        for method, correct in CORRECT.items():
            write_run(tmp_path / "runs" / f"{method}__iid__none__s{seed}", method, seed, correct)
        write_run(tmp_path / "runs" / f"centralized__pooled__none__s{seed}", "fedavg", seed, range(0, 240),
                  baseline="centralized")
    return tmp_path


def test_paired_comparison_with_baselines(results_dir):
    comparison = compare(load_results(results_dir), ("", "iid", "none"), "fedavg", replicates=500)
    rows = {r.method: r for r in comparison.rows}
    assert list(rows) == ["fedavg", "ffa", "flora", "centralized (no DP)", MAJORITY]
    assert rows["fedavg"].score.estimate == pytest.approx(0.5) and rows["fedavg"].diff.high == 0
    ffa = rows["ffa"].diff  # the same 20 extra examples in every seed: no seed variation, only examples
    assert ffa.estimate == pytest.approx(0.05) and 0 < ffa.low < 0.05 < ffa.high
    flora = rows["flora"].diff  # as many right, different examples: no difference, but a wide interval
    assert flora.estimate == pytest.approx(0.0) and flora.low < -0.03 and flora.high > 0.03
    assert rows["centralized (no DP)"].diff.estimate == pytest.approx(0.1)
    assert rows[MAJORITY].score.estimate == pytest.approx(np.mean((np.r_[np.zeros(10), np.arange(10, N) % 4]) == 0))


def test_report_command_writes_tables_and_marks_stale_results(results_dir, capsys):
    stale = results_dir / "runs" / "ffa__iid__none__s2" / "summary.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "code_version": "0" * 16}))
    assert main([str(results_dir), "--no-plots", "--replicates", "300"]) == 0
    report = (results_dir / "report.md").read_text()
    assert "| ffa † | 8 | 0.01 | 3 | 55.0 [" in report and "**1 of 12 results are stale (†)**" in report
    assert "| majority class | – | – | 3 |" in report
    assert (results_dir / "results.csv").read_text().count("\n") == 13


DOC = """# Results

FedAvg reaches <!--= score iid/none fedavg -->50.0 [48.9, 51.1]<!--/--> % and FFA-LoRA is ahead by
<!--= diff iid/none ffa -->WRONG<!--/--> points <!--? diff iid/none ffa > 0 -->; FLoRA is not
distinguishable from FedAvg <!--? diff iid/none flora ~ 0 -->, centralized training is ahead
<!--? diff iid/none centralized > 0 -->. The paper reports <!--= paper +2.1 -->+2.1<!--/-->.

<!--= table iid/none -->
<!--/-->
"""


def test_the_document_is_rendered_from_the_data_and_checked(results_dir):
    evaluator = Evaluator(load_results(results_dir), "fedavg", replicates=300)
    rendered = render(DOC, evaluator)
    assert check(rendered, evaluator) == []
    assert "| ffa | 8 | 0.01 | 3 | 55.0 [" in rendered and "WRONG" not in rendered
    problems = check(DOC, evaluator)  # the hand-written values differ from the data
    assert any("'diff iid/none ffa' is 'WRONG'" in p for p in problems) and any("table differs" in p for p in problems)
    edited = rendered.replace("<!--? diff iid/none flora ~ 0 -->", "<!--? diff iid/none flora > 0 -->")
    edited += "\nFedAvg lost 0.313 from iid to natural, ±0.04, or 21.3 % of its accuracy.\n"
    problems = check(edited, evaluator)
    assert any("claim 'diff iid/none flora > 0'" in p and "contradicted" in p for p in problems)
    assert sum("looks measured" in p for p in problems) == 3
    assert any("unknown" in p or "no method" in p for p in check("<!--= score iid/none nope -->x<!--/-->", evaluator))


GRID = """name = "g"
num-clients = 2
[base]
"model.name" = "tiny-bert"
[[study]]
name = ""
strategies = ["fedavg", "ffa", "flora", "fedsb"]
partitions = ["iid", "dirichlet-0.1"]
privacy = ["none"]
seeds = [0, 1, 2]
baselines = ["centralized"]
[study.lr-sweep]
values = [0.01, 0.02]
seeds = [100]
"""


def test_a_document_written_before_the_suite_ends_shows_what_is_pending(results_dir, capsys):
    (results_dir / "grid.toml").write_text(GRID)
    assert main([str(results_dir), "--no-plots", "--replicates", "300"]) == 0
    doc = results_dir / "RESULTS.md"
    doc.write_text("Done: <!--= progress - -->x<!--/--> by <!--= code - -->x<!--/-->. Fed-SB: <!--= diff iid/none fedsb -->x<!--/-->; "
                   "skewed: <!--= diff dirichlet-0.1/none ffa -->x<!--/-->.\n\n<!--= table dirichlet-0.1/none -->\n"
                   "<!--/-->\n")
    assert main([str(results_dir), "--doc", str(doc), "--replicates", "300"]) == 0
    text = doc.read_text()
    # 9 main + 3 centralized finished of 4 × 2 × 3 main, 3 centralized and (4 + centralized) × 2 sweep cells
    assert "-->12 of 37 cells finished (lr sweep 0 of 10, main and baselines 12 of 27)<!--/-->" in text
    assert f"<!--= code - -->{RUNNING_CODE_VERSION} (all 12 results)<!--/-->" in text
    assert "fedsb -->pending (0 of 3 seeds)<!--/-->; skewed: <!--= diff dirichlet-0.1/none ffa -->pending (0 of 3" in text
    assert "<!--= table dirichlet-0.1/none -->pending (0 of 3 seeds)<!--/-->" in text
    assert main([str(results_dir), "--doc", str(doc), "--check", "--replicates", "300"]) == 0
    doc.write_text(text + "Fed-SB is better <!--? diff iid/none fedsb > 0 -->; <!--= diff iid/none fedx -->x<!--/-->\n")
    assert main([str(results_dir), "--doc", str(doc), "--check", "--replicates", "300"]) == 1
    doc.write_text("Line one.\nBy <!--= code nostudy -->x<!--/-->.\n")
    assert main([str(results_dir), "--doc", str(doc), "--replicates", "300"]) == 2
    assert doc.read_text() == "Line one.\nBy <!--= code nostudy -->x<!--/-->.\n"
    assert "line 2: 'code nostudy': no results of study 'nostudy'; nothing written" in capsys.readouterr().err
    evaluator = Evaluator(load_results(results_dir), "fedavg", 300)  # without the grid nothing is pending
    evaluator.results[0].summary["code_version"] = "0123456789abcdef"
    assert evaluator.value("code -") == f"{RUNNING_CODE_VERSION} (11), 0123456789abcdef (1)"
    assert any("no method 'fedsb'" in p for p in check(text, evaluator))


def test_the_cost_of_a_study_is_the_wall_time_of_its_cells(results_dir):
    evaluator = Evaluator(load_results(results_dir), "fedavg", 300)
    for result, seconds in zip(evaluator.results, [60.0, 120.0, 7200.0] + [90.0] * 9):
        result.summary["wall_seconds"] = seconds
    # 12 cells: 7,380 + 810 s; median of 60, 90 × 9, 120, 7200 is 90 s
    assert evaluator.value("cost -") == "12 cells: 2.3 hours of wall time, median 90 s a cell (cells × median: 0.3 hours)"
    with pytest.raises(DocError, match="no results of study 'privacy'"):
        evaluator.value("cost privacy")
