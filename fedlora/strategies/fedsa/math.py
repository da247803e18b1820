"""FedSA-LoRA's split of the adapter into what is shared (A, the head) and what each client keeps (B).

Its averages and the global model's aggregation error are FedIT's
(:func:`fedlora.strategies.fedavg.math.average_with_error`): the global model is (Ā, B̄).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar


from fedlora.adapters.lora import LORA_B
from fedlora.strategies.traffic import Shapes

T = TypeVar("T")


def shared_part(state: Mapping[str, T]) -> dict[str, T]:
    """What the clients receive: every tensor of ``state`` but the B factors (Ā and the head)."""
    return {k: v for k, v in state.items() if not k.endswith(LORA_B)}


def own_part(state: Mapping[str, T]) -> dict[str, T]:
    """What a client keeps for itself: the B factors of ``state``."""
    return {k: v for k, v in state.items() if k.endswith(LORA_B)}


def traffic(direction: str, server_round: int, adapter: Shapes, clients: int) -> Shapes:
    """Up: the whole adapter (A, B: r(d+k) per module, the head; B only for the global model).
    Down: everything but B (A: r·k per module, the head). Nothing in round 0."""
    if server_round == 0:
        return {}
    return dict(adapter) if direction == "up" else shared_part(adapter)
