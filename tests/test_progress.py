"""What the console shows during and after a round: each reply as it arrives, who is still out, and every client
left out of the round with its reason — checked on real rounds of the ServerApp over an in-process grid."""

from __future__ import annotations

import json
import re
import secrets
from typing import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedlora.server.progress as progress
from fedlora.client.app import app as client_app
from fedlora.run_config import full_defaults
from fedlora.runtime.inprocess import SERVER_NODE, InProcessGrid, run_inprocess
from fedlora.server.app import main as server_main
from fedlora.server.progress import error_reason
from fedlora.server.report import incident_lines, round_line

QUICK = {"model.name": "tiny-bert", "local-steps": 1, "batch-size": 4, "dataset.max-length": 16}


class SilentNodeGrid(InProcessGrid):
    """An in-process grid whose node ``silent`` never answers (a client that outlives round-timeout)."""

    silent = 2

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, message_id in zip(messages, ids):
            if message.metadata.dst_node_id == self.silent:
                self._replies.pop(message_id)
        return ids


def test_a_client_without_reply_is_named_while_waiting_and_after_the_round(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.5)
    run_config = {**full_defaults(), **QUICK, "num-server-rounds": 1, "round-timeout": 2.0,
                  "output-dir": str(tmp_path / "run")}
    run_id = secrets.randbits(62)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE, run_id
    grid = SilentNodeGrid(client_app, run_config, 2, run_id)
    server_main(grid, Context(run_id=run_id, node_id=SERVER_NODE, node_config={}, state=RecordDict(),
                              run_config=run_config))
    out = capsys.readouterr().out
    assert re.search(r"\[fedlora\] round 1: node 1 \(partition 0\) replied after \d+\.\d s: train_loss=\S+ after 1 "
                     r"local steps in \d+\.\d s of its own, \d+ rows; 1 of 2 out", out), out
    assert re.search(r"\[fedlora\] round 1: 1 of 2 clients out after \d+ s: node 2 \(round-timeout 2 s\)", out), out
    assert "clients=1/2" in out
    assert ("[fedlora] round 1: left out node 2: no reply within round-timeout = 2 s (raise round-timeout to wait "
            "longer for slow clients)") in out


def test_failed_clients_are_named_with_their_reason(tmp_path, capsys):
    out_dir = tmp_path / "run"
    run_inprocess({**QUICK, "num-server-rounds": 2, "faults.dropout": 0.5, "seed": 3, "output-dir": str(out_dir)},
                  num_nodes=3)
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    left_out = [(r["round"], reason) for r in records for reason in r.get("rejected", [])]
    assert left_out, "the seed drops some clients"
    for number, reason in left_out:
        assert reason.split(": ", 1)[1].startswith("InjectedDropout: injected dropout (faults.dropout)")
        assert f"[fedlora] round {number}: left out {reason}" in out
    assert out.count("replied after") == 3 * 2


def test_lines_of_a_round_record():
    record = {"round": 2, "eval_accuracy": 0.5, "eval_loss": 1.0, "train_loss": 1.5, "num_clients": 3.0,
              "num_sampled": 4.0, "bytes_up": 10.0, "bytes_down": 20.0, "rejected": ["node 7: late"],
              "clipped": ["node 3: weight capped"], "skipped": "1 valid replies < min-clients = 2"}
    assert round_line(record, 5, "eval_accuracy", False) == ("[fedlora] round 2/5 eval_accuracy=0.5000 eval_loss=1.0000 "
                                                             "train_loss=1.5000 clients=3/4 up=10B down=20B")
    assert incident_lines(record) == ["[fedlora] round 2: left out node 7: late",
                                      "[fedlora] round 2 skipped (1 valid replies < min-clients = 2): the global "
                                      "adapter is unchanged"]


def test_flowers_exception_format_reads_as_one_line():
    assert error_reason("<class 'fedlora.client.faults.InjectedDropout'>:<'partition 0\nfails'>") == \
        "InjectedDropout: partition 0 fails"
    assert error_reason("Error: Node Unavailable") == "Error: Node Unavailable"
