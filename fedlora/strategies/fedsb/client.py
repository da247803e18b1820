"""Fed-SB's client part: the setup phase's gradient estimate, then training of R only on the fixed B, A."""

from __future__ import annotations

import torch

from fedlora.adapters.lora import inputs_in_own_dtype
from fedlora.adapters.lorasb import (
    LORASB_R, gradient_estimate, inject_lorasb, load_lorasb_state, lorasb_factors, lorasb_modules, lorasb_state,
)
from fedlora.adapters.state import AdapterState
from fedlora.adapters.transport import digest, from_record
from fedlora.client.privacy import RoundPlan
from fedlora.client.role import ClientRole, Incoming
from fedlora.config import RunConfig
from fedlora.data.tokenize import collate, endless_batches
from fedlora.losses import loss_per_example
from fedlora.models.checkpointing import set_gradient_checkpointing
from fedlora.models.loading import load_base_model
from fedlora.models.precision import base_spec
from fedlora.privacy.dp_gradient import dp_gradient_estimate
from fedlora.process_cache import on_clear
from fedlora.protocol import FEDSB_TARGETS, LORASB_FACTORS
from fedlora.task import load_task

_LORASB_MODELS: dict[tuple, torch.nn.Module] = {}
on_clear(_LORASB_MODELS.clear)


def fedsb_base(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """A fresh frozen base held as ``model.*`` says (its dtype; Fed-SB refuses a quantized base at config time)."""
    task = load_task(cfg)
    return load_base_model(cfg.model.name, task.kind, task.num_labels, base_spec(cfg.model, device))


def lorasb_model(cfg: RunConfig, frozen: AdapterState, trainable: AdapterState, device: torch.device) -> torch.nn.Module:
    """The base model with LoRA-SB on the modules of ``frozen`` (B, A), built once per process and factors.

    R and the head train in float32 whatever the base's dtype (the head casts its input to its own
    dtype); layers checkpoint when ``model.gradient-checkpointing`` is on.
    """
    key = (cfg, digest(frozen), str(device))
    if key not in _LORASB_MODELS:
        _LORASB_MODELS.clear()
        base = fedsb_base(cfg, device)
        heads = sorted({k.rsplit(".", 1)[0] for k in trainable if not k.endswith(LORASB_R)})
        model = inject_lorasb(base, lorasb_modules(frozen), cfg.lora.rank, cfg.lora.alpha / cfg.lora.rank,
                              lorasb_factors(frozen, trainable), modules_to_save=heads)
        for name, module in model.named_modules():
            if name in heads and next(module.parameters()).dtype != torch.float32:
                module.float().register_forward_pre_hook(inputs_in_own_dtype)
        set_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
        _LORASB_MODELS[key] = model
    return _LORASB_MODELS[key]


class OnlyR(ClientRole):
    """Keep the B, A received once (node state); train and upload only R (+ head)."""

    def prepare(self, msg: Incoming) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        store = msg.store()
        if LORASB_FACTORS in msg.content.array_records:
            store.put(LORASB_FACTORS, from_record(msg.content[LORASB_FACTORS]))
        frozen = store.get(LORASB_FACTORS)
        if frozen is None:
            raise RuntimeError("Fed-SB: this node never received the fixed B/A factors; refusing to train")
        received = msg.received()
        model = lorasb_model(msg.cfg, frozen, received, msg.device)
        load_lorasb_state(model, received)
        return model, [p for p in model.parameters() if p.requires_grad]

    def upload(self, model: torch.nn.Module, msg: Incoming) -> AdapterState:
        return lorasb_state(model)

    def setup_steps(self, cfg: RunConfig) -> int:
        return cfg.section("fedsb").init_batches

    def setup(self, cfg: RunConfig, rows: list[dict], config: dict, partition_id: int, device: torch.device,
              privacy: RoundPlan | None) -> AdapterState:
        """Full-weight gradient of every target module over ``fedsb.init-batches`` local batches.

        Without ``privacy``: the mean batch gradient. With it (sample-level DP): the clipped,
        noised estimate of :func:`fedlora.privacy.dp_gradient.dp_gradient_estimate` at the
        plan's σ and q, over as many Poisson batches.
        """
        targets = str(config[FEDSB_TARGETS]).split(",")
        batches_wanted = self.setup_steps(cfg)
        task = load_task(cfg)
        model = fedsb_base(cfg, device)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + partition_id)

        def loss_of(m: torch.nn.Module, batch: dict) -> torch.Tensor:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            return loss_per_example(task.kind, m(**batch).logits, labels).mean()

        if privacy is not None:
            return dp_gradient_estimate(model, len(rows), targets, lambda m, i: loss_of(m, collate([rows[i]], task.pad_id)),
                                        batches_wanted, privacy.sample_rate, privacy.noise_multiplier,
                                        cfg.dp.max_grad_norm, generator)
        batches = endless_batches(len(rows), cfg.batch_size, generator)
        picked = [collate([rows[i] for i in next(batches)], task.pad_id) for _ in range(batches_wanted)]
        return gradient_estimate(model, picked, targets, loss_of)
