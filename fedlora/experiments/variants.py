"""Equal-communication variants: a strategy at the rank whose upload per training round matches a reference's.

Strategies that upload less per round (FFA-LoRA: B only; Fed-SB: the r×r matrix R) also train
fewer parameters at the same rank, so comparing them at one rank confounds method with
capacity. A variant runs the strategy at the rank r' whose mean upload per training round
(rounds 1..N, values summed over every uploaded array, from the registry's byte contract
``traffic`` and the model's adapter shapes) is closest to the reference strategy's at
``lora.rank`` — for a square d×d module r' = 2r for FFA-LoRA (r'·d = r·2d) and r' ≈ √(2rd)
for Fed-SB (r'² = r(d+k)). The rank is computed, never written by hand; ties go to the smaller
rank. ``lora.alpha`` is scaled with the rank (α' = α·r'/r), so the update's scale s = α/r is
the reference's and only the capacity changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from fedlora.adapters.lora import adapter_state
from fedlora.process_cache import process_cache
from fedlora.run_config import full_defaults, load_config
from fedlora.strategies.registry import spec_of
from fedlora.strategies.traffic import Shapes, at_rank, lora_dims
from fedlora.task import server_model

Traffic = Callable[[str, int, Shapes, int], Shapes]


def upload_per_round(traffic: Traffic, adapter: Shapes, rounds: int, clients: int) -> float:
    """Values one client uploads per training round, averaged over rounds 1..``rounds`` (setup round excluded)."""
    return sum(sum(math.prod(s) for s in traffic("up", r, adapter, clients).values())
               for r in range(1, rounds + 1)) / rounds


def matching_rank(traffic: Traffic, reference: Traffic, adapter: Shapes, rounds: int, clients: int) -> int:
    """The rank r' in 1..min(d, k) at which ``traffic``'s upload per round is closest to ``reference``'s at the
    adapter's own rank (ties: the smaller rank)."""
    target = upload_per_round(reference, adapter, rounds, clients)
    largest = min(min(d, k) for d, k, _ in lora_dims(adapter).values())
    gaps = [(abs(upload_per_round(traffic, at_rank(adapter, r), rounds, clients) - target), r)
            for r in range(1, largest + 1)]
    return min(gaps)[1]


def variant_keys(rank: int, base_rank: int, base_alpha: float) -> dict[str, Any]:
    """The LoRA keys of a variant at ``rank``: the rank, and α scaled so that s = α/r stays the base's."""
    return {"lora.rank": rank, "lora.alpha": base_alpha * rank / base_rank}


@process_cache(maxsize=4)
def _adapter_shapes(model: str, dataset_items: tuple[tuple[str, Any], ...], rank: int, targets: str) -> Shapes:
    flat = {**full_defaults(), **dict(dataset_items), "model.name": model, "lora.rank": rank, "lora.targets": targets,
            "device": "cpu"}
    return {k: tuple(v.shape) for k, v in adapter_state(server_model(load_config(flat), "cpu")).items()}


def adapter_shapes(config: Mapping[str, Any]) -> Shapes:
    """Shapes of the initial adapter of the run ``config`` (a flat run config): peft names, A r×k, B d×r, the head."""
    cfg = load_config({**full_defaults(), **config})
    dataset = tuple((k, v) for k, v in cfg.to_flat().items() if k.startswith("dataset."))
    return _adapter_shapes(cfg.model.name, dataset, cfg.lora.rank, cfg.lora.targets)


def resolve_variant(strategy: str, reference: str, config: Mapping[str, Any], clients: int) -> dict[str, Any]:
    """The LoRA keys of ``strategy`` at the rank whose upload per round matches ``reference``'s in run ``config``."""
    cfg = load_config({**full_defaults(), **config})
    rank = matching_rank(spec_of(strategy).traffic_formula(), spec_of(reference).traffic_formula(),
                         adapter_shapes(config), cfg.num_server_rounds, clients)
    return variant_keys(rank, cfg.lora.rank, cfg.lora.alpha)
