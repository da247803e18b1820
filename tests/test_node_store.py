"""Client state that must outlive a SuperNode restart lives on the node's disk."""

import numpy as np
from flwr.app import Context, RecordDict

from fedlora.client.node_store import NodeStore, run_label


RUN = "run-0123abcd"


def _context(tmp_path, node_id=5):
    return Context(run_id=77, node_id=node_id, node_config={"state-dir": str(tmp_path)}, state=RecordDict(), run_config={})


def test_state_survives_a_restart_with_empty_context(tmp_path):
    state = {"m.lorasb_B.weight": np.arange(6, dtype=np.float32).reshape(3, 2)}
    NodeStore(_context(tmp_path), partition_id=1, run=RUN).put("lorasb-factors", state)
    restarted = NodeStore(_context(tmp_path, node_id=9), partition_id=1, run=RUN)  # new process, new node id, same partition
    loaded = restarted.get("lorasb-factors")
    np.testing.assert_array_equal(loaded["m.lorasb_B.weight"], state["m.lorasb_B.weight"])
    assert NodeStore(_context(tmp_path), partition_id=2, run=RUN).get("lorasb-factors") is None
    assert not list(tmp_path.rglob(".*")), "no temporary files left behind"


def test_sites_without_partition_use_their_node_id(tmp_path):
    NodeStore(_context(tmp_path, node_id=3), partition_id=-1, run=RUN).put("merge-1", {"x": np.ones(2, np.float32)})
    assert NodeStore(_context(tmp_path, node_id=3), partition_id=-1, run=RUN).get("merge-1") is not None
    assert NodeStore(_context(tmp_path, node_id=4), partition_id=-1, run=RUN).get("merge-1") is None


def test_the_run_label_is_the_servers_run_key_when_sent():
    context = Context(run_id=77, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert run_label(context, {"run-key": "0123abcd"}) == RUN, "a resumed server run keeps its key"
    assert run_label(context, {}) == "run77"
