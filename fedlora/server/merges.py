"""Base-weight merges by round, for strategies whose server changes every client's base (FLoRA, FedEx-LoRA).

The server keeps each round's merge; every node receives, with its next training message,
exactly the merges it has not yet seen (``merge-<round>`` records), and replays them onto
its base (:func:`fedlora.client.role.replay_merges`). A skipped round merges nothing, so
every node's base versions stay in step.
"""

from __future__ import annotations

from typing import Any

from peft import PeftModel

from fedlora.adapters.lora import bring_base_to
from fedlora.adapters.state import AdapterState
from fedlora.protocol import merge_record
from fedlora.server.strategy import prefixed, unprefixed


class MergeLog:
    """The merge of every round so far, and the round each node's base has reached."""

    def __init__(self) -> None:
        self.merges: dict[int, AdapterState] = {}
        #: node id -> last round whose merge the node holds (per run: not checkpointed, node ids change)
        self.node_version: dict[int, int] = {}

    def record(self, server_round: int, merge: AdapterState) -> None:
        self.merges[server_round] = merge

    def missing(self, node_id: int, server_round: int) -> dict[str, AdapterState]:
        """The ``merge-<j>`` records node ``node_id`` lacks before training round ``server_round``."""
        return {merge_record(j): self.merges[j] for j in range(self.node_version.get(node_id, 0) + 1, server_round)}

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        for node in node_ids:
            self.node_version[node] = server_round - 1

    def bring(self, model: PeftModel) -> None:
        """Merge every recorded round into ``model``'s base that it has not merged yet."""
        bring_base_to(model, max(self.merges, default=0), self.merges.get)

    def checkpoint(self) -> tuple[AdapterState, dict[str, Any]]:
        arrays: AdapterState = {}
        for j, merge in self.merges.items():
            arrays.update(prefixed(f"merge-{j}/", merge))
        return arrays, {"merges": {str(j): list(m) for j, m in self.merges.items()}}

    def restore(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        self.merges = {int(j): unprefixed(f"merge-{j}/", arrays, keys) for j, keys in values["merges"].items()}
