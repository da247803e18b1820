"""The one in-memory form of an adapter: tensor name -> float32 numpy array.

Names follow peft's saved-adapter naming (``…query.lora_A.weight``) or LoRA-SB's
(``…query.lorasb_R.weight``); everything that travels, is checkpointed or is averaged
is an :data:`AdapterState`.
"""

from __future__ import annotations

import numpy as np

AdapterState = dict[str, np.ndarray]
