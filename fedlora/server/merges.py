"""Base-weight merges by round, for strategies whose server changes every client's base (FLoRA, FedEx-LoRA).

The server keeps each round's merge as it travels (a weighted stack of the clients' factors,
:mod:`fedlora.adapters.stack`, or a dense ``<m>.base_delta.weight`` where that is smaller, then
also as a stack); their total — what the final adapter must add to the base — is folded and
concatenated once, when the final adapter is saved.
Every node receives, with its next training message, exactly the merges it has not yet seen
(``merge-<round>`` records) and replays them onto its base
(:func:`fedlora.client.role.replay_merges`). A skipped round merges nothing, so every node's
base versions stay in step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from peft import PeftModel

from fedlora.adapters.lora import LORA_A, bring_base_to, load_adapter_state
from fedlora.adapters.stack import folded_state, is_stack
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS, merge_record
from fedlora.server.strategy import ServerStrategy, prefixed, unprefixed
from fedlora.strategies.common import concat_factors
from fedlora.task import save_final_adapter, skeleton_model


class MergeLog:
    """The merge of every round so far (their factored total on demand), and the round each node's base has reached."""

    def __init__(self) -> None:
        self.merges: dict[int, AdapterState] = {}
        #: rounds whose merge travels dense: the same update as LoRA factors (for the total)
        self.factored: dict[int, AdapterState] = {}
        #: node id -> last round whose merge the node holds (per run: not checkpointed, node ids change)
        self.node_version: dict[int, int] = {}

    def record(self, server_round: int, merge: AdapterState, factors: AdapterState | None = None) -> None:
        """Keep ``merge`` (as it travels) for ``server_round``; ``factors`` is the same update as a weighted
        stack when ``merge`` holds dense deltas (default: ``merge`` itself)."""
        self.merges[server_round] = merge
        if factors is not None and factors is not merge:
            self.factored[server_round] = factors

    def total(self) -> AdapterState:
        """Σ of every merge as one stack of LoRA factors per module (scale 1), folded and concatenated once when
        asked for (a round only records its merge: no run-long stack is copied every round)."""
        rounds = [self.factored.get(j, self.merges[j]) for j in sorted(self.merges)]
        return concat_factors([folded_state(merge) if is_stack(merge) else merge for merge in rounds])

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
        for j, factors in self.factored.items():
            arrays.update(prefixed(f"merge-factors-{j}/", factors))
        return arrays, {"merges": {str(j): list(m) for j, m in self.merges.items()},
                        "merge_factors": {str(j): list(f) for j, f in self.factored.items()}}

    def restore(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        self.merges = {int(j): unprefixed(f"merge-{j}/", arrays, keys) for j, keys in values["merges"].items()}
        self.factored = {int(j): unprefixed(f"merge-factors-{j}/", arrays, keys)
                         for j, keys in values["merge_factors"].items()}

    def save_with(self, cfg: RunConfig, adapter: AdapterState, path: Path) -> None:
        """Save total + ``adapter`` (LoRA factors at scale 1 and the extras) as one exact peft LoRA in ``path``.

        The rank of the saved LoRA is that of the concatenated factors, so
        ``W0 + B·A`` of the saved adapter equals the server's merged base plus ``adapter``. It is
        written in the portable format of every final adapter, from an adapter on a skeleton of
        the base (no base weights load).
        """
        state = concat_factors([self.total(), adapter])
        rank = next(v.shape[0] for k, v in state.items() if k.endswith(LORA_A))
        final = skeleton_model(cfg, dataclasses.replace(cfg.lora, rank=rank, alpha=float(rank), client_ranks=""))
        load_adapter_state(final, state)
        save_final_adapter(final, path, cfg)


class MergingServer(ServerStrategy):
    """A server part whose rounds change every base: it sends each node the merges it lacks, with the global state.

    Subclasses record each round's merge in ``self.log`` from :meth:`aggregate`; a skipped
    round records an empty one. The log is checkpointed with the rest of the state.
    """

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, initial_state)
        self.log = MergeLog()

    def downloads(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        return {ARRAYS: self.state, **self.log.missing(node_id, server_round)}

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        self.log.delivered(server_round, node_ids)

    def skipped(self, server_round: int) -> None:
        self.log.record(server_round, {})

    def checkpoint_state(self) -> tuple[AdapterState, dict[str, Any]]:
        """Adds every round's merge and their total (who received which is per run, not kept)."""
        arrays, values = super().checkpoint_state()
        merge_arrays, merge_values = self.log.checkpoint()
        return {**arrays, **merge_arrays}, {**values, **merge_values}

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        super().restore_state(arrays, values)
        self.log.restore(arrays, values)

