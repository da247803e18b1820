"""The embedded offline corpus: English question/answer pairs of ``chatterbot-corpus`` (BSD).

Each YAML file under ``chatterbot_corpus/data/english`` is one topic (ai, food, money, …)
holding conversations as lists of turns. Every pair of consecutive turns becomes one
(prompt, response) example tagged with its topic, so the topic is a natural non-IID key.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

PACKAGE = "chatterbot_corpus"


def corpus_dir() -> Path:
    """The installed English corpus folder (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded dataset needs the '{PACKAGE.replace('_', '-')}' package; "
            "install it with `pip install --no-deps chatterbot-corpus` (make run/test do)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def load_pairs() -> list[dict[str, str]]:
    """All consecutive-turn pairs as ``{"prompt", "response", "topic"}``, in file order."""
    rows: list[dict[str, str]] = []
    for path in sorted(corpus_dir().glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for turns in doc.get("conversations", []):
            turns = [str(t).strip() for t in turns if t is not None]
            for prompt, response in zip(turns, turns[1:]):
                if prompt and response:
                    rows.append({"prompt": prompt, "response": response, "topic": path.stem})
    return rows
