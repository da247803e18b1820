"""DP wired through the apps: cumulative ε per node, restarts, budget enforcement, user-level DP."""

import json
import os
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from fedlora.client.privacy import load_history
from fedlora.config import ConfigError
from fedlora.run_config import load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.strategies.registry import names, strategies

LINEAR = [n for n, s in strategies().items() if s.capabilities.linear]
NOT_LINEAR = [n for n, s in strategies().items() if not s.capabilities.linear]

TINY = {"model.name": "tiny-bert", "local-steps": 3, "batch-size": 8, "dataset.max-length": 32,
        "dataset.eval-max-examples": 32, "lora.rank": 4}


def run(tmp_path, **overrides):
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    run_inprocess({**TINY, "output-dir": str(out), **overrides}, num_nodes=2)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _history_files():
    return sorted(Path(os.environ["FEDLORA_STATE_DIR"]).glob("privacy-run*-p*.json"), key=os.path.getmtime)


def test_reported_epsilon_is_cumulative_and_matches_a_standalone_accountant(tmp_path):
    records = run(tmp_path, **{"num-server-rounds": 3, "dp.mode": "sample", "dp.noise-multiplier": 1.1})
    eps = [r["epsilon_max"] for r in records[1:]]
    assert eps == sorted(eps) and eps[0] > 0, "ε grows over rounds: it is cumulative"
    files = _history_files()[-2:]
    standalone = []
    for path in files:
        entries = json.loads(path.read_text())["entries"]
        assert len(entries) == 3 and all(s == 1.1 and k == 3 for s, _, k in entries)
        accountant = RDPAccountant()
        for sigma, q, steps in entries:
            for _ in range(steps):
                accountant.step(noise_multiplier=sigma, sample_rate=q)
        standalone.append(accountant.get_epsilon(delta=1e-5))
    assert records[-1]["epsilon_max"] == pytest.approx(max(standalone), rel=1e-9)


def test_epsilon_survives_a_client_process_restart(tmp_path):
    run(tmp_path, **{"num-server-rounds": 2, "dp.mode": "sample", "dp.noise-multiplier": 1.1})
    path = _history_files()[-1]
    label, partition = path.stem.removeprefix("privacy-").rsplit("-p", 1)
    restarted = Context(run_id=0, node_id=99, node_config={}, state=RecordDict(), run_config={})
    history = load_history(restarted, int(partition), label)
    assert len(history.entries) == 2 and history.epsilon(1e-5) > 0


def test_budget_is_enforced_and_refusals_reported(tmp_path):
    target = 2.0
    records = run(tmp_path, **{"num-server-rounds": 5, "dp.mode": "sample", "dp.noise-multiplier": 0.9,
                               "dp.target-epsilon": target})
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4, 5], "the run completes past the budget"
    refused = [reason for r in records for reason in r.get("rejected", [])]
    assert refused and all("refused: privacy budget" in reason for reason in refused)
    assert all(r["epsilon_max"] <= target for r in records[1:] if "epsilon_max" in r)
    assert records[-1]["num_clients"] == 0


def test_calibrated_noise_meets_the_target(tmp_path):
    records = run(tmp_path, **{"num-server-rounds": 2, "dp.mode": "sample", "dp.target-epsilon": 3.0})
    assert 0 < records[-1]["epsilon_max"] <= 3.0
    assert not any(r.get("rejected") for r in records)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("strategy", names())
def test_sample_dp_works_with_every_strategy(tmp_path, strategy, mode):
    records = run(tmp_path, strategy=strategy, **{"num-server-rounds": 2, "dp.mode": "sample",
                                                    "dp.noise-multiplier": 1.0, "dp.grad-sample-mode": mode})
    assert all(r["num_clients"] == 2 for r in records[1:]), "two rounds: RoLoRA trains B, then A"
    assert 0 < records[1]["epsilon_max"] < records[2]["epsilon_max"]


@pytest.mark.parametrize("strategy", LINEAR)
def test_user_level_dp_runs_for_linear_averages(tmp_path, strategy):
    """The wrapped strategy's own metrics still appear (agg_error, bytes) beside the cumulative user-level ε."""
    records = run(tmp_path, strategy=strategy, **{"num-server-rounds": 2, "dp.mode": "user", "dp.noise-multiplier": 1.0})
    eps = [r["epsilon"] for r in records[1:]]
    assert eps[0] < eps[1]
    assert all("agg_error" in r and r["bytes_up"] > 0 and r["noise-multiplier"] == 1.0 for r in records[1:])


@pytest.mark.parametrize("strategy", NOT_LINEAR)
def test_user_level_dp_refused_for_non_linear_strategies(strategy):
    with pytest.raises(ConfigError, match="'dp.mode'.*'strategy'.*not bound") as err:
        load_config({"strategy": strategy, "dp.mode": "user", "dp.noise-multiplier": 1.0})
    assert strategies()[strategy].capabilities.not_linear in str(err.value)


def test_dp_without_noise_or_budget_is_refused():
    with pytest.raises(ConfigError, match="dp.noise-multiplier"):
        load_config({"dp.mode": "sample"})


def _standalone_epsilon(entries):
    accountant = RDPAccountant()
    for sigma, q, steps in entries:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=1e-5)


def test_fedsb_initial_gradients_are_private_and_accounted(tmp_path):
    """The dense gradient upload before round 1 is a DP release: round 1's ε counts it."""
    records = run(tmp_path, strategy="fedsb", **{"num-server-rounds": 1, "dp.mode": "sample",
                                                   "dp.noise-multiplier": 1.1, "fedsb.init-batches": 2})
    assert records[0]["epsilon_max"] > 0, "round 0 (the gradient round) already spends privacy"
    histories = [json.loads(p.read_text())["entries"] for p in _history_files()[-2:]]
    assert all([k for _, _, k in h] == [2, 3] for h in histories), "init-batches steps, then local-steps"
    expected = max(_standalone_epsilon(h) for h in histories)
    assert records[1]["epsilon_max"] == pytest.approx(expected, rel=1e-9)


class _Crash(RuntimeError):
    pass


def test_epsilon_continues_after_a_server_resume(tmp_path, monkeypatch):
    """The resumed run is a new Flower run; the nodes still count every release since the start."""
    import fedlora.server.rounds as server_rounds

    out = tmp_path / "crashed"
    config = {**TINY, "output-dir": str(out), "num-server-rounds": 2, "dp.mode": "sample", "dp.noise-multiplier": 1.1}
    real_write = server_rounds.write_checkpoint

    def crash_after_round_1(path, checkpoint):
        real_write(path, checkpoint)
        if checkpoint.server_round == 1:
            raise _Crash("server killed after round 1")

    monkeypatch.setattr(server_rounds, "write_checkpoint", crash_after_round_1)
    with pytest.raises(_Crash):
        run_inprocess(config, num_nodes=2)
    monkeypatch.setattr(server_rounds, "write_checkpoint", real_write)
    run_inprocess({**config, "resume-from": str(out)}, num_nodes=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = run(tmp_path, **{"num-server-rounds": 2, "dp.mode": "sample", "dp.noise-multiplier": 1.1})
    assert records[2]["epsilon_max"] == pytest.approx(uninterrupted[2]["epsilon_max"], rel=1e-9)
    assert records[2]["epsilon_max"] > records[1]["epsilon_max"]


def test_fedsb_gradient_round_is_a_user_level_release(tmp_path):
    """Under user-level DP the mean gradient that fixes B, A is clipped, noised and accounted like a round."""
    from fedlora.privacy.user_dp import user_level_epsilon

    records = run(tmp_path, strategy="fedsb", **{"num-server-rounds": 1, "dp.mode": "user", "dp.noise-multiplier": 1.0})
    assert records[0]["epsilon"] == pytest.approx(user_level_epsilon([(1.0, 1.0, 1)], 1e-5), rel=1e-9)
    assert records[1]["epsilon"] == pytest.approx(user_level_epsilon([(1.0, 1.0, 1)] * 2, 1e-5), rel=1e-9)
