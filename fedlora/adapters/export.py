"""The final adapter in the one portable format every strategy writes: a peft adapter that loads elsewhere.

    final_adapter/adapter_config.json        peft's, ``base_model_name_or_path`` = the base's hub id
                                             (:func:`fedlora.models.portable.portable_id`), never a path here
    final_adapter/adapter_model.safetensors  the adapter (LoRA factors, a classification head), float32
    final_adapter/README.md                  peft's model card, naming the same base
    final_adapter/labels.json                classification: ``num_labels``, ``id2label``, ``label2id``

On another machine, from a copy of the directory:

    AutoPeftModelForCausalLM.from_pretrained(copy)
    AutoPeftModelForSequenceClassification.from_pretrained(copy, **json.loads((copy / "labels.json").read_text()))

(the labels are keyword arguments because the base's own config has none: peft builds the
head of the base it downloads). The model written needs no base weights: a server that
evaluates nothing, and the merged FLoRA/FedEx-LoRA adapter, write from a meta-device
skeleton (:func:`fedlora.task.skeleton_model`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel

from fedlora.adapters.lora import DEFAULT_ADAPTER

LABELS_FILE = "labels.json"


def label_kwargs(labels: Sequence[str]) -> dict:
    """``from_pretrained`` keyword arguments that give a sequence classifier these labels, in id order."""
    return {"num_labels": len(labels), "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


def save_portable(model: PeftModel, path: Path, base_id: str, labels: Sequence[str] = ()) -> None:
    """Write ``model``'s adapter to ``path`` in the format of the module docstring, naming its base ``base_id``.

    The model's one adapter must be peft's default one (peft writes any other into a subdirectory).
    """
    if model.active_adapter != DEFAULT_ADAPTER or len(model.peft_config) != 1:
        raise ValueError(f"a final adapter is a model's only, default adapter; this model has "
                         f"{list(model.peft_config)}")
    config, base = model.peft_config[DEFAULT_ADAPTER], model.get_base_model()
    previous = config.base_model_name_or_path, base.config.name_or_path, base.name_or_path
    # what adapter_config.json and README.md name as the base
    config.base_model_name_or_path = base.config.name_or_path = base.name_or_path = base_id
    try:
        model.save_pretrained(path, save_embedding_layers=False)  # never trained; peft would look the base id up
    finally:
        config.base_model_name_or_path, base.config.name_or_path, base.name_or_path = previous
    if labels:
        (Path(path) / LABELS_FILE).write_text(json.dumps(label_kwargs(labels), indent=2) + "\n")
