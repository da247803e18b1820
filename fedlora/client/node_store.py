"""Client state that must outlive a SuperNode restart: kept in ``context.state`` and on the node's disk.

Flower keeps ``context.state`` only while the SuperNode process lives. What a node cannot
afford to lose — Fed-SB's fixed B/A factors, FLoRA's merges, the DP accountant history —
is also written under the node's state directory (node config ``state-dir``, else
``$FEDLORA_STATE_DIR``, else ``~/.cache/fedlora/node-state``), per run and node, as
safetensors files written atomically (:func:`fedlora.atomic_write.write_atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import Context
from safetensors.numpy import load_file, save

from fedlora.adapters.stack import wire_dtype
from fedlora.adapters.transport import from_record, to_record
from fedlora.atomic_write import write_atomic
from fedlora.adapters.state import AdapterState

STATE_DIR_ENV = "FEDLORA_STATE_DIR"


def node_state_dir(node_config: Mapping[str, Any]) -> Path:
    """Where this node keeps state that must outlive its processes."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"])).expanduser()
    default = Path.home() / ".cache" / "fedlora" / "node-state"
    return Path(os.environ.get(STATE_DIR_ENV, default)).expanduser()


def run_label(context: Context, config: Mapping[str, Any]) -> str:
    """The logical run this message belongs to: the server's ``run-key`` (kept across a server
    resume, which starts a new Flower run), else the Flower run id."""
    return f"run-{config['run-key']}" if "run-key" in config else f"run{context.run_id}"


def node_label(context: Context, partition_id: int) -> str:
    """A name for this node that survives restarts: its partition id, else its node id."""
    return f"p{partition_id}" if partition_id >= 0 else f"n{context.node_id}"


class NodeStore:
    """Named adapter states of one node in one run, in memory (context.state) and on disk."""

    def __init__(self, context: Context, partition_id: int, run: str) -> None:
        """``run`` is :func:`run_label` of the message being served."""
        self.memory = context.state
        self.folder = node_state_dir(context.node_config) / f"{run}-{node_label(context, partition_id)}"

    def put(self, name: str, state: AdapterState) -> None:
        self.memory[name] = to_record(state)
        write_atomic(self.folder / f"{name}.safetensors",
                     save({k: np.ascontiguousarray(v, dtype=wire_dtype(k)) for k, v in state.items()}))

    def get(self, name: str) -> AdapterState | None:
        if name in self.memory.array_records:
            return from_record(self.memory[name])
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            return None
        state = load_file(str(path))
        self.memory[name] = to_record(state)
        return state
