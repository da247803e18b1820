"""Reliability: client faults, rejected updates, skipped rounds, and crash-and-resume, for every strategy.

Faults are injected on the client side (``faults.*``, drawn from (seed, round, partition))
and runs go through the in-process Grid with real Messages, so the server meets them as
error replies, late replies and malformed uploads. The expected fault of every client is
recomputed here with :func:`fedlora.client.faults.draw_fault` and compared with what the
server recorded.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

import fedlora.server.rounds as server_rounds
import fedlora.server.validation as validation
from fedlora.adapters.transport import from_record
from fedlora.client.faults import CORRUPT, CORRUPTIONS, DROPOUT, STRAGGLER, Fault, draw_fault
from fedlora.config import ConfigError, FaultsConfig
from fedlora.runtime.inprocess import run_inprocess
from flwr.app import MessageType
from fedlora.server.checkpoint import Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from fedlora.protocol import METRICS
from fedlora.server.influence import capped_shares
from fedlora.server.rounds import RoundLoop
from fedlora.strategies.registry import names, spec_of
from fedlora.server.validation import InvalidUpdate, num_examples_of, validate_upload

QUICK = {"model.name": "tiny-bert", "local-steps": 1, "batch-size": 4, "dataset.max-length": 16,
         "dataset.eval-max-examples": 8, "lora.rank": 2}
#: 3 nodes, 2 sampled a round; under seed 31 every fault kind occurs, a failed partition
#: later trains again (FLoRA catch-up) and round 3 has no valid reply (skipped)
FAULTY = {**QUICK, "seed": 31, "num-server-rounds": 3, "fraction-train": 0.67, "faults.dropout": 0.3,
          "faults.straggler": 0.2, "faults.corrupt": 0.3}
FAULTY_NODES = 3
ADAPTER = "final_adapter/adapter_model.safetensors"


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def spy_rounds(monkeypatch) -> dict[int, dict]:
    """Wrap the round loop: per training round, the replies it got and the global state before and after."""
    seen: dict[int, dict] = {}
    original_send, original_round = RoundLoop.send, RoundLoop.train_round

    def send(self, grid, number, nodes, message_type, extra_config=None):
        sent, replies = original_send(self, grid, number, nodes, message_type, extra_config)
        if message_type == MessageType.TRAIN and number >= 1:
            seen.setdefault(number, {})["replies"] = replies
        return sent, replies

    def train_round(self, grid, number):
        before = dict(self.strategy.state)
        record = original_round(self, grid, number)
        seen.setdefault(number, {}).update(before=before, after=dict(self.strategy.state))
        return record

    monkeypatch.setattr(RoundLoop, "send", send)
    monkeypatch.setattr(RoundLoop, "train_round", train_round)
    return seen


def partition_of(reply) -> int:
    """In-process node ids are partition + 1 (error replies carry no metrics)."""
    return reply.metadata.src_node_id - 1


def expected_reason(fault: Fault) -> str:
    return {DROPOUT: "InjectedDropout", STRAGGLER: "late, discarded", "nan": "non-finite", "inf": "non-finite",
            "shape": "has shape", "missing": "missing tensor"}[fault.corruption or fault.kind]


# ----- pure checks ------------------------------------------------------------------------
GOOD = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}
SHAPES = {"a": (2, 3), "b": (4,)}


@pytest.mark.parametrize("state, fragment", [
    ({"a": GOOD["a"]}, "missing tensor(s) ['b']"),
    ({**GOOD, "c": GOOD["b"]}, "unexpected tensor(s) ['c']"),
    ({**GOOD, "a": GOOD["a"].astype(np.float64)}, "dtype float64, expected float32"),
    ({**GOOD, "a": GOOD["a"][:1]}, "shape (1, 3), expected (2, 3)"),
    ({**GOOD, "b": np.array([0, np.nan, np.inf, 0], np.float32)}, "2 non-finite value(s)"),
    ({**GOOD, "a": np.full((2, 3), 11, np.float32)}, "root-mean-square 11 > validation.max-rms = 10"),
])
@pytest.mark.parametrize("reference", [None, GOOD, {"a": GOOD["a"] + 0.5, "b": GOOD["b"] - 9.0}],
                         ids=["no reference", "the same state", "another state"])
def test_invalid_uploads_are_rejected_with_their_reason(state, fragment, reference):
    validate_upload(GOOD, SHAPES, 10.0, reference)
    with pytest.raises(InvalidUpdate) as err:
        validate_upload(state, SHAPES, 10.0, reference)
    assert fragment in str(err.value)


def test_the_rms_bound_is_settled_by_the_reference_norm_or_else_by_the_tensor_own_squares(monkeypatch):
    """‖x‖ ≤ ‖R‖ + ‖x − R‖ clears uploads well inside the bound without their own squares (the reference's are
    summed once for every upload); near the bound the tensor's own squares decide, to the same verdict."""
    calls = []
    summed = validation.squares
    monkeypatch.setattr(validation, "squares", lambda flat: calls.append(flat.size) or summed(flat))
    shapes = {"a": (100,)}
    reference = validation.Reference({"a": np.ones(100, np.float32)})
    for rms in (2.0, 5.0):
        assert validate_upload({"a": np.full(100, rms, np.float32)}, shapes, 10.0, reference) == pytest.approx(
            100 * (rms - 1) ** 2, rel=1e-6)
    assert calls == [100], "the reference's squares once; the uploads' never"
    validate_upload({"a": np.full(100, 9.999, np.float32)}, shapes, 10.0, reference)  # ‖R‖ + ‖Δ‖: within 0.1 %
    assert calls == [100, 100], "near the bound: the upload's own squares"
    with pytest.raises(InvalidUpdate, match="root-mean-square 10.5 > validation.max-rms = 10"):
        validate_upload({"a": np.full(100, 10.5, np.float32)}, shapes, 10.0, reference)


def test_malformed_replies_are_recorded_and_the_valid_one_is_kept(monkeypatch):
    """Replies missing their records, or refusing without a metrics record, are rejected with their reason."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from fedlora.adapters.transport import to_record
    from fedlora.protocol import ARRAYS, CONFIG, NUM_EXAMPLES, PARTITION_ID, REFUSED, SERVER_ROUND, STATUS
    from fedlora.run_config import full_defaults, load_config
    from fedlora.server.round import Round

    for field in ("_run_id", "_node_id", "_task_id"):  # Messages are made as the server app of run 1 makes them
        monkeypatch.setattr(TaskIdentity, field, 1)
    cfg = load_config({**full_defaults(), "strategy": "fedavg"})
    loop = RoundLoop(spec_of("fedavg").server_class()(cfg, dict(GOOD)), cfg, evaluate=dict, reporter=None,
                     checkpoint=None)
    contents = {1: {ARRAYS: to_record(GOOD), METRICS: MetricRecord({NUM_EXAMPLES: 5, PARTITION_ID: 0})},
                2: {ARRAYS: to_record(GOOD)},
                3: {STATUS: ConfigRecord({REFUSED: "privacy budget spent"})},
                4: {METRICS: MetricRecord({NUM_EXAMPLES: 5, PARTITION_ID: 3})}}
    messages, replies = [], []
    for node, content in contents.items():
        message = Message(RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1})}), dst_node_id=node,
                          message_type=MessageType.TRAIN)
        message.metadata.__dict__["_message_id"] = f"m{node}"
        messages.append(message)
        replies.append(Message(RecordDict(content), reply_to=message))
    sent = Round(1, list(contents), len(contents), 0, 0.0,
                 destinations={m.metadata.message_id: m.metadata.dst_node_id for m in messages})
    done = loop.collect(sent, replies, lambda update: SHAPES, {})
    assert [u.node_id for u in done.updates] == [1]
    assert done.rejected == ["node 2 rejected: reply lacks its 'metrics' or 'arrays' record",
                             "node 3 refused: privacy budget spent",
                             "node 4 (partition 3) rejected: reply lacks its 'metrics' or 'arrays' record"]
    assert done.refused_epsilons == [0.0]


@pytest.mark.parametrize("value, fragment", [(0, "not > 0"), (-3, "not > 0"), (None, "not an integer"),
                                             (2.5, "not an integer"), ("7", "not an integer")])
def test_num_examples_must_be_a_positive_integer(value, fragment):
    assert num_examples_of({"num-examples": 12.0}) == 12
    with pytest.raises(InvalidUpdate, match=fragment):
        num_examples_of({"num-examples": value})


def test_fault_draws_are_deterministic_per_seed_round_and_partition():
    cfg = FaultsConfig(dropout=0.3, straggler=0.2, corrupt=0.25)
    draws = [draw_fault(cfg, 7, r, p) for r in range(1, 201) for p in range(10)]
    assert draws == [draw_fault(cfg, 7, r, p) for r in range(1, 201) for p in range(10)]
    assert draws != [draw_fault(cfg, 8, r, p) for r in range(1, 201) for p in range(10)]
    share = {kind: sum(d.kind == kind for d in draws) / len(draws) for kind in (DROPOUT, STRAGGLER, CORRUPT)}
    assert abs(share[DROPOUT] - 0.3) < 0.03
    assert abs(share[STRAGGLER] - 0.7 * 0.2) < 0.03
    assert abs(share[CORRUPT] - 0.7 * 0.8 * 0.25) < 0.03
    assert {d.corruption for d in draws if d.kind == CORRUPT} == set(CORRUPTIONS)
    assert draw_fault(FaultsConfig(dropout=1.0), 7, 0, 0) == Fault(), "round 0 (Fed-SB's gradient round) is never faulted"


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_every_corruption_fails_validation(corruption):
    with pytest.raises(InvalidUpdate) as err:
        validate_upload(Fault(CORRUPT, corruption).apply(GOOD), SHAPES, 10.0)
    assert expected_reason(Fault(CORRUPT, corruption)) in str(err.value)


def test_checkpoint_round_trips_and_detects_truncation_and_corruption(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    arrays = {"state/x": np.arange(6, dtype=np.float32).reshape(2, 3), "merge-1/y": np.ones(5, np.float32)}
    write_checkpoint(path, Checkpoint(3, {"seed": 1}, arrays, {"rng": [3, [1, 2], None]}))
    back = read_checkpoint(path)
    assert back.server_round == 3 and back.config == {"seed": 1} and back.values == {"rng": [3, [1, 2], None]}
    assert all(np.array_equal(back.arrays[k], v) for k, v in arrays.items())
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file is left behind"
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*truncated or corrupt"):
        read_checkpoint(path)
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*checksum"):
        read_checkpoint(path)


# ----- end to end ---------------------------------------------------------------------------
def test_dropout_and_corruption_aggregate_exactly_the_valid_replies(tmp_path, monkeypatch):
    """FedAvg, 4 nodes, 5 rounds, 30 % dropout + 20 % corrupt (seed 0: rounds 1-2 fall below min-clients = 2)."""
    seen = spy_rounds(monkeypatch)
    faults = FaultsConfig(dropout=0.3, corrupt=0.2)
    out = tmp_path / "run"
    run_inprocess({**QUICK, "strategy": "fedavg", "seed": 0, "num-server-rounds": 5, "min-clients": 2,
                   "faults.dropout": faults.dropout, "faults.corrupt": faults.corrupt, "output-dir": str(out)}, num_nodes=4)
    skipped = 0
    for record in records(out)[1:]:
        r = record["round"]
        drawn = {p: draw_fault(faults, 0, r, p) for p in range(4)}
        healthy = sorted(p for p, f in drawn.items() if f.kind is None)
        assert record["num_clients"] == len(healthy)
        assert len(record.get("rejected", [])) == 4 - len(healthy)
        for reason in record.get("rejected", []):
            p = int(re.match(r"node (\d+)", reason).group(1)) - 1
            assert expected_reason(drawn[p]) in reason, (r, reason)
        valid = [m for m in seen[r]["replies"] if not m.has_error() and drawn[partition_of(m)].kind is None]
        assert sorted(partition_of(m) for m in valid) == healthy
        after, before = seen[r]["after"], seen[r]["before"]
        if len(healthy) < 2:
            skipped += 1
            assert "min-clients = 2" in record["skipped"]
            assert all(np.array_equal(after[k], before[k]) for k in before), "a skipped round changed the global state"
            continue
        sizes = np.array([m.content[METRICS]["num-examples"] for m in valid], dtype=np.float64)
        uploads = [from_record(m.content["arrays"]) for m in valid]
        weights = capped_shares(sizes / sizes.sum(), 0.5)  # validation.max-share's default
        for key in after:
            expected = sum(w * u[key].astype(np.float64) for w, u in zip(weights, uploads))
            np.testing.assert_allclose(after[key], expected, rtol=1e-5, atol=1e-7)
    assert skipped == 2
    final = load_file(str(out / ADAPTER))
    assert all(np.isfinite(v).all() for v in final.values())


@pytest.fixture(scope="module", params=names())
def faulty_run(request, tmp_path_factory):
    """An uninterrupted run of FAULTY per strategy, with every round's replies and states recorded."""
    monkeypatch = pytest.MonkeyPatch()
    seen = spy_rounds(monkeypatch)
    out = tmp_path_factory.mktemp(request.param) / "uninterrupted"
    try:
        run_inprocess({**FAULTY, "strategy": request.param, "output-dir": str(out)}, num_nodes=FAULTY_NODES)
    finally:
        monkeypatch.undo()
    return request.param, out, seen


def test_faults_never_crash_and_every_failure_is_recorded(faulty_run):
    strategy, out, seen = faulty_run
    history = records(out)
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    failed_before: set[int] = set()
    caught_up = False
    for record in history[1:]:
        r = record["round"]
        sampled = [partition_of(m) for m in seen[r]["replies"]]
        drawn = {p: draw_fault(FaultsConfig(0.3, 0.2, 0.3), FAULTY["seed"], r, p) for p in sampled}
        healthy = {p for p, f in drawn.items() if f.kind is None}
        assert record["num_clients"] == len(healthy) and record["num_sampled"] == 2
        assert len(record.get("rejected", [])) == len(sampled) - len(healthy)
        for reason in record.get("rejected", []):
            p = int(re.match(r"node (\d+)", reason).group(1)) - 1
            assert expected_reason(drawn[p]) in reason, (strategy, r, reason)
            assert "stale" not in reason and "lacks" not in reason and "never received" not in reason
        if healthy:
            assert record["agg_error"] < (1e-5 if spec_of(strategy).capabilities.exact else 1.0)
        else:
            assert record["skipped"] == "0 valid replies < min-clients = 1"
        caught_up |= bool(healthy & failed_before)
        failed_before |= set(sampled) - healthy
        assert np.isfinite(record["eval_loss"])
    assert caught_up, "a client that failed a round trains again later (FLoRA must send it the merges it missed)"
    assert all(np.isfinite(v).all() for v in load_file(str(out / ADAPTER)).values())


class SimulatedCrash(RuntimeError):
    """The server process dies."""


def test_kill_and_resume_equals_the_uninterrupted_run(faulty_run, monkeypatch):
    """Crash after round 2 is recorded but before its checkpoint (plus half a metrics line), then resume."""
    strategy, uninterrupted, _ = faulty_run
    out = uninterrupted.parent / "resumed"
    real_write = server_rounds.write_checkpoint

    def crash_at_round_2(path, checkpoint):
        if checkpoint.server_round == 2:
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write('{"round": 3, "strat')
            raise SimulatedCrash("killed before writing the checkpoint of round 2")
        real_write(path, checkpoint)

    config = {**FAULTY, "strategy": strategy, "output-dir": str(out)}
    monkeypatch.setattr(server_rounds, "write_checkpoint", crash_at_round_2)
    with pytest.raises(SimulatedCrash):
        run_inprocess(config, num_nodes=FAULTY_NODES)
    monkeypatch.setattr(server_rounds, "write_checkpoint", real_write)
    assert read_checkpoint(out / "checkpoint.safetensors").server_round == 1
    assert not (out / "final_adapter").exists()

    run_inprocess({**config, "resume-from": str(out)}, num_nodes=FAULTY_NODES)
    resumed, reference = records(out), records(uninterrupted)
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(resumed, reference):
        assert a.get("num_clients") == b.get("num_clients") and a.get("rejected") == b.get("rejected")
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
    final, expected = load_file(str(out / ADAPTER)), load_file(str(uninterrupted / ADAPTER))
    assert final.keys() == expected.keys()
    for key in final:
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=f"{strategy} {key}")
    assert json.loads((out / "summary.json").read_text())["initial"] == reference[0]["eval_accuracy"]


def test_truncated_checkpoint_is_named_on_resume(tmp_path):
    out = tmp_path / "run"
    config = {**QUICK, "strategy": "fedavg", "num-server-rounds": 1, "output-dir": str(out)}
    run_inprocess(config, num_nodes=2)
    checkpoint = out / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint)) + ".*truncated or corrupt"):
        run_inprocess({**config, "num-server-rounds": 2, "resume-from": str(out)}, num_nodes=2)
    with pytest.raises(CheckpointError, match="no checkpoint at " + re.escape(str(tmp_path / "elsewhere"))):
        run_inprocess({**config, "output-dir": "", "resume-from": str(tmp_path / "elsewhere")}, num_nodes=2)


def test_resume_refuses_a_config_that_changes_the_math(tmp_path):
    out = tmp_path / "run"
    config = {**QUICK, "strategy": "fedavg", "num-server-rounds": 1, "output-dir": str(out)}
    run_inprocess(config, num_nodes=2)
    with pytest.raises(ConfigError, match="'lr': 0.005 -> 0.1"):
        run_inprocess({**config, "lr": 0.1, "resume-from": str(out)}, num_nodes=2)


def test_run_without_nodes_ends_with_skipped_rounds(tmp_path):
    out = tmp_path / "run"
    run_inprocess({**QUICK, "strategy": "fedavg", "num-server-rounds": 2, "round-timeout": 0.5,
                   "output-dir": str(out)}, num_nodes=0)
    assert [r.get("skipped") for r in records(out)[1:]] == ["no node connected within round-timeout = 0.5 s"] * 2


def test_a_locked_run_directory_refuses_a_second_serverapp_until_its_owner_is_gone(tmp_path):
    """A process that holds the run directory (an old ServerApp still alive) blocks a resume there, naming itself;
    killed (its lock dies with it), the resume continues the run."""
    import socket
    import subprocess
    import sys

    from fedlora.server.lock import RunDirectoryLocked

    out = tmp_path / "run"
    config = {**QUICK, "num-server-rounds": 1, "output-dir": str(out)}
    run_inprocess(config, num_nodes=2)
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom pathlib import Path\n"
                               "from fedlora.server.lock import run_directory_lock\n"
                               f"with run_directory_lock(Path({str(out)!r}), 4242):\n"
                               "    print('locked', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryLocked, match=rf"in use by the ServerApp of run 4242 \(pid {holder.pid} "
                                                     rf"on {re.escape(socket.gethostname())}"):
            run_inprocess({**config, "num-server-rounds": 2, "resume-from": str(out)}, num_nodes=2)
        assert [r["round"] for r in records(out)] == [0, 1], "the refused ServerApp touched nothing"
    finally:
        holder.kill()
        holder.wait()
    run_inprocess({**config, "num-server-rounds": 2, "resume-from": str(out)}, num_nodes=2)
    assert [r["round"] for r in records(out)] == [0, 1, 2]
