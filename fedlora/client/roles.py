"""What a client does with the global state, per strategy: prepare the model, then upload.

A role turns a training message into a model ready to train (global state loaded, the
strategy's trainable tensors unfrozen) and the trained model into the state it uploads:

* :class:`FullLoRA`  — fedavg, lorafair: load A, B (+ head); train and upload all of them.
* :class:`FrozenA`   — ffa: A comes from the shared run seed and never travels; only B (+ head).
* :class:`FreshLoRA` — flora: replay the server's merges onto the base, then a fresh LoRA each round.
* :class:`OnlyR`     — fedsb: LoRA-SB with the B, A received once; only R (+ head) trains and travels.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import Context, RecordDict
from peft import PeftModel

from fedlora.adapters.lora import (
    LORA_A,
    AdapterState,
    adapter_state,
    fresh_lora_state,
    load_adapter_state,
    bring_base_to,
    set_trainable,
)
from fedlora.adapters.lorasb import (
    LORASB_R,
    gradient_estimate,
    inject_lorasb,
    load_lorasb_state,
    lorasb_factors,
    lorasb_modules,
    lorasb_state,
)
from fedlora.adapters.transport import digest, from_record
from fedlora.data.tokenize import collate, endless_batches
from fedlora.losses import loss_per_example
from fedlora.models.loading import load_base_model
from fedlora.strategies.fedsb import FACTORS
from fedlora.client.node_store import NodeStore, run_label
from fedlora.client.privacy import RoundPlan
from fedlora.config import RunConfig
from fedlora.privacy.dp_gradient import dp_gradient_estimate
from fedlora.strategies.base import ARRAYS, CONFIG
from fedlora.task import adapted_model, load_task


def frozen_a(state: AdapterState) -> AdapterState:
    return {k: v for k, v in state.items() if k.endswith(LORA_A)}


class ClientRole:
    """Default: nothing frozen beyond the base model (FedIT-style clients)."""

    train_a = True

    def prepare(self, cfg: RunConfig, content: RecordDict, context: Context, partition_id: int,
                server_round: int, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        model = adapted_model(cfg, str(device))
        load_adapter_state(model, self.full_state(model, from_record(content[ARRAYS]), content))
        return model, set_trainable(model, train_a=self.train_a)

    def full_state(self, model: PeftModel, received: AdapterState, content: RecordDict) -> AdapterState:
        return received

    def upload(self, model: torch.nn.Module) -> AdapterState:
        return adapter_state(model)

    def reply_metrics(self, cfg: RunConfig, partition_id: int) -> dict[str, int | float]:
        """Extra numbers for the reply (e.g. the client's rank)."""
        return {"rank": cfg.lora.rank}


class FullLoRA(ClientRole):
    """fedavg and lorafair clients: the whole adapter travels both ways."""


class FrozenA(ClientRole):
    """FFA-LoRA clients: A is the seeded initial A on every client; only B (+ head) travels."""

    train_a = False

    def full_state(self, model: PeftModel, received: AdapterState, content: RecordDict) -> AdapterState:
        own_a = frozen_a(model.initial_state)
        expected = str(content["config"].get("ffa-a-digest", ""))
        if expected and expected != digest(own_a):
            raise RuntimeError(
                f"FFA-LoRA: this client's frozen A (digest {digest(own_a)}) differs from the server's ({expected}); "
                "server and clients must use the same model, lora.* settings, seed and torch version"
            )
        return {**own_a, **received}

    def upload(self, model: torch.nn.Module) -> AdapterState:
        return {k: v for k, v in adapter_state(model).items() if not k.endswith(LORA_A)}



MERGE_PREFIX = "merge-"


class FreshLoRA(ClientRole):
    """FLoRA clients: bring the base up to date with every merge so far, then train a fresh rank-r_k LoRA.

    Merges arrive as ``merge-<round>`` array records (the server sends each node the ones it
    has not yet received) and are kept in the node's state, so the process's cached model —
    which may serve several nodes in simulation, or start from scratch for every message in
    a deployment — can always replay exactly the merges ``1 … round−1`` onto its base weights.
    """

    def prepare(self, cfg: RunConfig, content: RecordDict, context: Context, partition_id: int,
                server_round: int, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        lora = dataclasses.replace(cfg.lora, rank=cfg.lora.rank_of(partition_id))
        model = adapted_model(cfg, str(device), lora, variant=f"flora-run-{context.run_id}")
        store = NodeStore(context, partition_id, run_label(context, content[CONFIG]))
        for name in content.array_records:
            if name.startswith(MERGE_PREFIX):
                store.put(name, from_record(content[name]))
        bring_base_to(model, server_round - 1, lambda j: store.get(f"{MERGE_PREFIX}{j}"))
        fresh = fresh_lora_state(model, seed=(cfg.seed, server_round, partition_id))
        load_adapter_state(model, {**fresh, **from_record(content[ARRAYS])})
        return model, set_trainable(model)

    def reply_metrics(self, cfg: RunConfig, partition_id: int) -> dict[str, int | float]:
        return {"rank": cfg.lora.rank_of(partition_id)}



_LORASB_MODELS: dict[tuple, torch.nn.Module] = {}


def lorasb_model(cfg: RunConfig, frozen: AdapterState, trainable: AdapterState, device: torch.device) -> torch.nn.Module:
    """The base model with LoRA-SB on the modules of ``frozen`` (B, A), built once per process and factors."""
    key = (cfg, digest(frozen), str(device))
    if key not in _LORASB_MODELS:
        _LORASB_MODELS.clear()
        task = load_task(cfg)
        base = load_base_model(cfg.model.name, task.kind, task.num_labels).to(device)
        heads = sorted({k.rsplit(".", 1)[0] for k in trainable if not k.endswith(LORASB_R)})
        _LORASB_MODELS[key] = inject_lorasb(base, lorasb_modules(frozen), cfg.lora.rank, cfg.lora.alpha / cfg.lora.rank,
                                            lorasb_factors(frozen, trainable), modules_to_save=heads)
    return _LORASB_MODELS[key]


class OnlyR(ClientRole):
    """Fed-SB clients: keep the B, A received once (node state); train and upload only R (+ head)."""

    def prepare(self, cfg: RunConfig, content: RecordDict, context: Context, partition_id: int,
                server_round: int, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        store = NodeStore(context, partition_id, run_label(context, content[CONFIG]))
        if FACTORS in content.array_records:
            store.put(FACTORS, from_record(content[FACTORS]))
        frozen = store.get(FACTORS)
        if frozen is None:
            raise RuntimeError("Fed-SB: this node never received the fixed B/A factors; refusing to train")
        received = from_record(content[ARRAYS])
        model = lorasb_model(cfg, frozen, received, device)
        load_lorasb_state(model, received)
        return model, [p for p in model.parameters() if p.requires_grad]

    def upload(self, model: torch.nn.Module) -> AdapterState:
        return lorasb_state(model)

    @staticmethod
    def initial_gradients(cfg: RunConfig, rows: list[dict], targets: list[str], partition_id: int,
                          device: torch.device, privacy: RoundPlan | None = None) -> AdapterState:
        """Full-weight gradient of every target module over ``fedsb.init-batches`` local batches.

        Without ``privacy``: the mean batch gradient. With it (sample-level DP): the clipped,
        noised estimate of :func:`fedlora.privacy.dp_gradient.dp_gradient_estimate` at the
        plan's σ and q, over as many Poisson batches.
        """
        task = load_task(cfg)
        model = load_base_model(cfg.model.name, task.kind, task.num_labels).to(device)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + partition_id)

        def loss_of(m: torch.nn.Module, batch: dict) -> torch.Tensor:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            return loss_per_example(task.kind, m(**batch).logits, labels).mean()

        if privacy is not None:
            return dp_gradient_estimate(model, len(rows), targets, lambda m, i: loss_of(m, collate([rows[i]], task.pad_id)),
                                        cfg.fedsb.init_batches, privacy.sample_rate, privacy.noise_multiplier,
                                        cfg.dp.max_grad_norm, generator)
        batches = endless_batches(len(rows), cfg.batch_size, generator)
        picked = [collate([rows[i] for i in next(batches)], task.pad_id) for _ in range(cfg.fedsb.init_batches)]
        return gradient_estimate(model, picked, targets, loss_of)


#: strategy name -> client role
ROLES: dict[str, ClientRole] = {"fedavg": FullLoRA(), "lorafair": FullLoRA(), "ffa": FrozenA(), "flora": FreshLoRA(), "fedsb": OnlyR()}


def client_role(strategy: str) -> ClientRole:
    return ROLES[strategy]
