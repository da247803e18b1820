"""What a client does with a strategy's messages: prepare the model, then say what to upload.

A strategy's client part is a :class:`ClientRole` subclass named in its registry entry.
The ClientApp (:mod:`fedlora.client.app`) calls, for a training message,
:meth:`ClientRole.prepare` (global state loaded into the process's cached model, the
strategy's trainable tensors unfrozen), runs the local loop, then :meth:`ClientRole.upload`.
The default role is FedIT's: load the whole adapter, train A, B (and a head), upload all.

Strategies whose server changes the base weights (FLoRA's stacks, FedEx-LoRA's residuals)
send ``merge-<round>`` records; :func:`replay_merges` keeps them in the node's store and
brings the cached model's base up to the round before training.
"""

from __future__ import annotations

import torch
from flwr.app import Context, RecordDict
from peft import PeftModel

from fedlora.adapters.lora import adapter_state, bring_base_to, load_adapter_state, set_trainable
from fedlora.adapters.state import AdapterState
from fedlora.adapters.transport import from_record
from fedlora.client.node_store import NodeStore, run_label
from fedlora.client.privacy import RoundPlan
from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS, CONFIG, MERGE_PREFIX, RANK, merge_record
from fedlora.task import adapted_model


class ClientRole:
    """FedIT's client: the whole adapter travels both ways, A, B and the head train."""

    train_a = True
    train_b = True

    def prepare(self, cfg: RunConfig, content: RecordDict, context: Context, partition_id: int,
                server_round: int, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """The model to train this round (global state loaded) and its trainable parameters."""
        model = adapted_model(cfg, str(device))
        load_adapter_state(model, self.full_state(model, from_record(content[ARRAYS]), content))
        return model, self.trainable(model, server_round)

    def trainable(self, model: PeftModel, server_round: int) -> list[torch.nn.Parameter]:
        """Unfreeze what this strategy trains in ``server_round``; the parameters to optimise."""
        return set_trainable(model, train_a=self.train_a, train_b=self.train_b)

    def full_state(self, model: PeftModel, received: AdapterState, content: RecordDict) -> AdapterState:
        """The whole adapter state to load, from what the server sent."""
        return received

    def upload(self, model: torch.nn.Module, server_round: int) -> AdapterState:
        """What the client sends back after training."""
        return adapter_state(model)

    def reply_metrics(self, cfg: RunConfig, partition_id: int) -> dict[str, int | float]:
        """Extra numbers for the reply: the client's LoRA rank."""
        return {RANK: cfg.lora.rank_of(partition_id)}

    def setup_steps(self, cfg: RunConfig) -> int:
        """DP steps of the setup phase before round 1 (0: the strategy has none)."""
        return 0

    def setup(self, cfg: RunConfig, rows: list[dict], config: dict, partition_id: int, device: torch.device,
              privacy: RoundPlan | None) -> AdapterState:
        """The upload of the setup phase (only strategies with ``Capabilities.setup_round`` are asked)."""
        raise RuntimeError(f"{type(self).__name__}: this strategy has no setup phase")


def replay_merges(model: PeftModel, content: RecordDict, context: Context, partition_id: int,
                  server_round: int) -> None:
    """Store the ``merge-<j>`` records of ``content`` in the node's store, then merge rounds up to ``server_round − 1``.

    The merges outlive the process (node store on disk), so the cached model — which may
    serve several nodes in simulation, or be fresh after a restart — can always replay
    exactly the merges 1 … round−1 onto its base weights; a missing one is refused.
    """
    store = NodeStore(context, partition_id, run_label(context, content[CONFIG]))
    for name in content.array_records:
        if name.startswith(MERGE_PREFIX):
            store.put(name, from_record(content[name]))
    bring_base_to(model, server_round - 1, lambda j: store.get(merge_record(j)))
