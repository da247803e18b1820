"""The one in-memory form of an adapter: tensor name -> float32 numpy array.

Names follow peft's saved-adapter naming (``…query.lora_A.weight``) or LoRA-SB's
(``…query.lorasb_R.weight``); everything that travels, is checkpointed or is averaged
is an :data:`AdapterState`.
"""

from __future__ import annotations

import numpy as np
import torch

AdapterState = dict[str, np.ndarray]
#: suffixes of a LoRA pair's factors in peft's naming: A (r×k) and B (d×r) of ``<module>``
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


def to_tensor(array: np.ndarray, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """A torch copy of ``array`` (received arrays are read-only views of a message's bytes: never alias them)."""
    return torch.tensor(np.asarray(array), dtype=dtype, device=device)
