"""A seeded adapter state from names and shapes alone: the same numbers on every machine, whatever holds the base.

For every LoRA pair of a template (module m with A of shape r×k, B of shape d×r) and any
other trainable tensor (a classification head):

    A ~ U(−1/√k, 1/√k)   (peft's Kaiming-uniform with a = √5),   B = 0,
    head weight (2-D) ~ N(0, σ²)  (σ = the base config's ``initializer_range``),   head bias = 0,

drawn from ``numpy.random.default_rng(seed)`` in sorted name order. Only names and shapes go
in, so a client on a bf16 GPU, a 4-bit client, a CPU server and a server without any base
weights (:func:`fedlora.models.loading.skeleton_base_model`) all start from identical
float32 adapters — which FFA-LoRA's frozen A and every strategy's round 1 rely on.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.adapters.state import LORA_A, LORA_B, AdapterState

Shapes = Mapping[str, tuple[int, ...]]
#: transformers' usual ``initializer_range``, for a config that has none
DEFAULT_INIT_STD = 0.02


def seeded_adapter_state(shapes: Shapes, seed: int | tuple[int, ...],
                         head_std: float = DEFAULT_INIT_STD) -> AdapterState:
    """The adapter of the module docstring for tensors ``shapes`` (name -> shape), as float32 arrays."""
    rng = np.random.default_rng(seed)
    state: AdapterState = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name.endswith(LORA_A):
            bound = 1.0 / np.sqrt(shape[1])
            state[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        elif name.endswith(LORA_B) or len(shape) != 2:
            state[name] = np.zeros(shape, dtype=np.float32)
        else:
            state[name] = rng.normal(0.0, head_std, size=shape).astype(np.float32)
    return state
