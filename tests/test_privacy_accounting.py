"""Privacy accounting (fedlora.privacy.accounting): cumulative ε, persistence, budget enforcement."""

import json
import math

import pytest
from flwr.app import ConfigRecord
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.privacy.accounting import (
    AccountantEntry,
    AccountantHistory,
    calibrate_noise,
    epsilon_after,
    planned_steps,
    would_exceed,
)

DELTA = 1e-5
ROUND = AccountantEntry(noise_multiplier=1.1, sample_rate=0.05, num_steps=20)


def standalone_epsilon(entries: list[AccountantEntry], accountant: str) -> float:
    """What a single Opacus accountant reports after being stepped through the same history."""
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for e in entries:
        for _ in range(e.num_steps):
            acc.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    return acc.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_history_epsilon_equals_standalone_accountant_and_grows(accountant):
    rounds = [ROUND, AccountantEntry(0.9, 0.08, 10), ROUND]
    history = AccountantHistory()
    previous = 0.0
    for n, entry in enumerate(rounds, start=1):
        history.add(entry)
        eps = history.epsilon(DELTA, accountant)
        assert eps == pytest.approx(standalone_epsilon(rounds[:n], accountant), rel=1e-6)
        assert eps > previous
        previous = eps


def test_epsilon_is_cumulative_not_per_round():
    history = AccountantHistory([ROUND, ROUND, ROUND])
    one_round = AccountantHistory([ROUND]).epsilon(DELTA)
    assert history.epsilon(DELTA) > 1.2 * one_round  # composition is sub-linear, but far above one round
    assert history.epsilon(DELTA) == pytest.approx(AccountantHistory([AccountantEntry(1.1, 0.05, 60)]).epsilon(DELTA))


def test_empty_and_noise_free_histories():
    assert AccountantHistory().epsilon(DELTA) == 0.0
    assert AccountantHistory([AccountantEntry(1.0, 0.1, 0)]).epsilon(DELTA) == 0.0
    assert AccountantHistory([AccountantEntry(0.0, 0.1, 5)]).epsilon(DELTA) == math.inf


def test_history_survives_save_and_load(tmp_path):
    path = tmp_path / "node-3" / "privacy.json"
    history = AccountantHistory([ROUND, AccountantEntry(0.8, 0.1, 7)])
    history.save(path)
    restarted = AccountantHistory.load(path)  # as a fresh process would
    assert restarted == history
    assert restarted.epsilon(DELTA) == history.epsilon(DELTA)
    assert [p.name for p in path.parent.iterdir()] == ["privacy.json"]  # no temporary file left behind
    assert AccountantHistory.load(tmp_path / "missing.json") == AccountantHistory()


def test_save_replaces_the_file_atomically(tmp_path):
    path = tmp_path / "privacy.json"
    AccountantHistory([ROUND]).save(path)
    AccountantHistory([ROUND, ROUND]).save(path)
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_corrupt_history_file_is_an_error_not_a_reset(tmp_path):
    path = tmp_path / "privacy.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="refusing to reset"):
        AccountantHistory.load(path)


def test_history_round_trips_through_a_flower_config_record():
    history = AccountantHistory([ROUND, AccountantEntry(0.7, 0.2, 3)])
    record = ConfigRecord(history.to_record())
    assert AccountantHistory.from_record(record) == history
    assert AccountantHistory.from_record(ConfigRecord()) == AccountantHistory()


def test_planned_steps():
    assert planned_steps(num_rounds=10, participation=0.5, local_steps=20) == 100
    assert planned_steps(num_rounds=3, participation=1 / 3, local_steps=5) == 5
    assert planned_steps(num_rounds=5, participation=0.3, local_steps=3) == 5  # 4.5 rounded up


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_meets_the_budget(accountant):
    steps = planned_steps(num_rounds=5, participation=1.0, local_steps=20)
    sigma = calibrate_noise(target_epsilon=3.0, delta=DELTA, sample_rate=0.05, steps=steps, accountant=accountant)
    eps = AccountantHistory([AccountantEntry(sigma, 0.05, steps)]).epsilon(DELTA, accountant)
    assert 2.9 <= eps <= 3.0


def test_would_exceed_refuses_exactly_when_the_next_round_passes_the_target():
    history = AccountantHistory([ROUND, ROUND])
    eps_next = epsilon_after(history, ROUND, DELTA)
    assert not would_exceed(history, ROUND, eps_next, DELTA)  # landing exactly on the target is allowed
    assert not would_exceed(history, ROUND, eps_next * 1.0001, DELTA)
    assert would_exceed(history, ROUND, eps_next * 0.9999, DELTA)
    with pytest.raises(ValueError, match="target_epsilon > 0"):
        would_exceed(history, ROUND, 0.0, DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_plan_past_the_budget_never_reports_more_than_the_target(accountant):
    target, heavy = 6.0, AccountantEntry(1.0, 0.1, 20)  # about 4.2, 5.4, 6.3 after 1, 2, 3 rounds
    history, reported, refused = AccountantHistory(), [], 0
    for _ in range(12):  # more rounds than the budget pays for
        if would_exceed(history, heavy, target, DELTA, accountant):
            refused += 1
            continue
        history.add(heavy)
        reported.append(history.epsilon(DELTA, accountant))
    assert refused > 0 and reported
    assert max(reported) <= target
    assert reported == sorted(reported)
