"""FLoRA: stack the clients' LoRA factors so the aggregate is exact for any mix of ranks.

Each round clients start from a fresh LoRA (A random, B = 0) on the current base. For one
module with client factors B_k (d×r_k), A_k (r_k×k), scales s_k and weights p_k:

    B_stack = [B_1  B_2  …  B_K]                      d × Σ_k r_k
    A_stack = [p_1 s_1 A_1; p_2 s_2 A_2; …; p_K s_K A_K]   Σ_k r_k × k
    B_stack · A_stack = Σ_k p_k s_k B_k A_k            (exact)

The server merges ``ΔW = B_stack·A_stack`` into the base weights, and every client must
receive the same stacked factors (rank Σ_k r_k, scale folded in, i.e. applied with scale 1).
Fully-trained tensors (a head) are averaged plainly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel

from fedlora.adapters.lora import bring_base_to, inject_lora, load_adapter_state
from fedlora.config import RunConfig, parse_ranks
from fedlora.models.loading import load_base_model
from fedlora.strategies.base import ARRAYS, ClientUpdate, LoraStrategy, prefixed, unprefixed
from fedlora.strategies.validation import InvalidUpdate, Shapes
from fedlora.task import load_task

from fedlora.adapters.lora import LORA_A, LORA_B, lora_modules
from fedlora.strategies.common import AdapterState, aggregate_extras, check_same_keys, ideal_factors, relative_error


def _module_factors(states: Sequence[AdapterState], module: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [s[module + LORA_B] for s in states], [s[module + LORA_A] for s in states]


def stacked_state(states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float]) -> AdapterState:
    """Per module, ``<module>.lora_B.weight`` = B_stack and ``<module>.lora_A.weight`` = A_stack (float32).

    Rank Σ_k r_k with every client's p_k s_k folded into A_stack: the update is B_stack·A_stack
    at scale 1 (what :func:`fedlora.adapters.lora.merge_into_base` adds). Only the factors;
    average the other tensors with ``aggregate_extras``.
    """
    check_same_keys(states)
    out: AdapterState = {}
    for module in lora_modules(states[0]):
        out[module + LORA_B], out[module + LORA_A] = ideal_factors(*_module_factors(states, module), scales, weights,
                                                                   dtype=np.float32)
    return out


def concat_stacks(a: AdapterState, b: AdapterState) -> AdapterState:
    """Accumulate two stacked updates: ``[B_a B_b]·[A_a; A_b] = B_a A_a + B_b A_b`` per module.

    An empty ``a`` is the empty update (returns ``b``). Both must stack the same modules;
    tensors that are not LoRA factors are taken from ``b``, the later update.
    """
    if not a:
        return dict(b)
    modules = lora_modules(b)
    if lora_modules(a) != modules:
        raise ValueError("cannot concatenate stacks over different LoRA modules")
    out = {k: v for k, v in b.items() if not k.endswith((LORA_A, LORA_B))}
    for m in modules:
        out[m + LORA_B] = np.concatenate([a[m + LORA_B], b[m + LORA_B]], axis=1)
        out[m + LORA_A] = np.concatenate([a[m + LORA_A], b[m + LORA_A]], axis=0)
    return out


def flora_error(stack: AdapterState, states: Sequence[AdapterState], weights: np.ndarray, scales: Sequence[float]) -> float:
    """‖B_stack·A_stack − Σ_k p_k s_k B_k A_k‖_F / ‖Σ_k p_k s_k B_k A_k‖_F for the ``stack`` that is merged
    (:func:`stacked_state`, float32), against the float64 ideal: zero up to float32 rounding."""
    check_same_keys(states)

    def pairs():
        for m in lora_modules(states[0]):
            applied = (stack[m + LORA_B].astype(np.float64), stack[m + LORA_A].astype(np.float64))
            yield applied, ideal_factors(*_module_factors(states, m), scales, weights)

    return relative_error(pairs())


class FLoRA(LoraStrategy):
    """FLoRA: stack the clients' weighted factors, merge s·B_stack·A_stack into every base, restart LoRA.

    The global state is the fully-trained extras (a head); each round's stack is kept so that
    every node receives, with its next training message, exactly the merges it has not yet
    seen (``merge-<round>`` records: Σ_k r_k (d+k) floats per module and round).
    """

    name = "flora"

    checkpointed = ("total",)  # the running sum of all merges (the final adapter)

    def __init__(self, cfg: RunConfig, initial_state: AdapterState) -> None:
        super().__init__(cfg, {k: v for k, v in initial_state.items() if not k.endswith((LORA_A, LORA_B))})
        self.merges: dict[int, AdapterState] = {}
        self.total: AdapterState = {}
        self.node_version: dict[int, int] = {}
        self.module_dims = {m: (initial_state[m + LORA_B].shape[0], initial_state[m + LORA_A].shape[1])
                            for m in lora_modules(initial_state)}

    def download(self, server_round: int, node_id: int) -> dict[str, AdapterState]:
        missing = range(self.node_version.get(node_id, 0) + 1, server_round)
        return {ARRAYS: self.state, **{f"merge-{j}": self.merges[j] for j in missing}}

    def delivered(self, server_round: int, node_ids: list[int]) -> None:
        for node in node_ids:
            self.node_version[node] = server_round - 1

    def skip_round(self, server_round: int) -> None:
        """A skipped round merges nothing: an empty merge keeps every node's base versions in step."""
        self.merges[server_round] = {}

    def expected_upload(self, update: ClientUpdate) -> Shapes:
        """The extras plus, per module, A (r_k×k) and B (d×r_k) at the rank r_k the client announces."""
        allowed = set(parse_ranks(self.cfg.lora.client_ranks)) or {self.cfg.lora.rank}
        rank = update.metrics.get("rank")
        if rank is None or not float(rank).is_integer() or int(rank) not in allowed:
            raise InvalidUpdate(f"announced rank {rank!r} is not one of the configured ranks {sorted(allowed)}")
        r = int(rank)
        shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        for m, (d, k) in self.module_dims.items():
            shapes[m + LORA_A] = (r, k)
            shapes[m + LORA_B] = (d, r)
        return shapes

    def checkpoint_state(self) -> tuple[AdapterState, dict[str, Any]]:
        """Adds every round's merge (``node_version`` is per run, not kept)."""
        arrays, values = super().checkpoint_state()
        for j, merge in self.merges.items():
            arrays.update(prefixed(f"merge-{j}/", merge))
        return arrays, {**values, "merges": {str(j): list(m) for j, m in self.merges.items()}}

    def restore_state(self, arrays: AdapterState, values: dict[str, Any]) -> None:
        super().restore_state(arrays, values)
        self.merges = {int(j): unprefixed(f"merge-{j}/", arrays, keys) for j, keys in values["merges"].items()}

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> tuple[AdapterState, dict[str, float]]:
        states = [u.state for u in updates]
        scales = [self.cfg.lora.alpha / u.metrics["rank"] for u in updates]
        stack = stacked_state(states, weights, scales)
        self.merges[self.current_round] = stack
        self.total = concat_stacks(self.total, stack) if self.total else stack
        extras = aggregate_extras(states, weights, (LORA_A, LORA_B))
        rank = next(iter(v.shape[0] for k, v in stack.items() if k.endswith(LORA_A)))
        return extras, {"agg_error": flora_error(stack, states, weights, scales), "stacked_rank": float(rank)}

    def apply_to(self, model: PeftModel) -> None:
        bring_base_to(model, max(self.merges, default=0), self.merges.get)
        zero_lora = {k: v for k, v in model.initial_state.items() if k.endswith((LORA_A, LORA_B))}
        load_adapter_state(model, {**zero_lora, **self.state})

    def save_final(self, model: PeftModel, path: Path) -> None:
        """The run's whole merged update as one exact LoRA of the total stacked rank (scale 1)."""
        if not self.total:
            return super().save_final(model, path)
        rank = next(v.shape[0] for k, v in self.total.items() if k.endswith(LORA_A))
        lora = dataclasses.replace(self.cfg.lora, rank=rank, alpha=float(rank), client_ranks="")
        task = load_task(self.cfg)
        final = inject_lora(load_base_model(self.cfg.model.name, task.kind, task.num_labels), lora, task.kind, self.cfg.seed)
        load_adapter_state(final, {**self.total, **self.state})
        final.save_pretrained(path)
