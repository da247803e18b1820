"""WordNet 3.0 as two offline tasks: supersense classification and word definitions.

The data come from Debian's ``wordnet-base`` package (WordNet 3.0 licence), installed by
``make experiments-setup`` (``apt-get install -y --no-install-recommends wordnet-base``), in
``$FEDLORA_WORDNET_DIR`` (default ``/usr/share/wordnet``). Each of ``data.noun``, ``data.verb``,
``data.adj`` and ``data.adv`` holds a licence header (lines starting with two spaces) and one
synset per line (wndb(5WN))::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id …] p_cnt [ptr …] [frames …] | gloss

``lex_filenum`` (two decimal digits) names the synset's lexicographer file — its supersense,
one of the 45 :data:`LEXNAMES` of lexnames(5WN); ``w_cnt`` is two hexadecimal digits; words
write spaces as ``_`` and adjectives may end in a syntactic marker ``(a)``, ``(p)`` or ``(ip)``.
A gloss is a definition followed by quoted examples: ``definition; "example"; "example"``.

Two built-in datasets, one row per synset (117,659 in WordNet 3.0), each with the columns
``topic`` (the supersense, e.g. ``noun.animal``) and ``pos`` (noun, verb, adj, adv) for
natural splits (``partition.column``):

* ``wordnet-supersenses`` (classification, 45 labels in lex_filenum order): ``text`` = the part
  of speech, up to :data:`MAX_LEMMAS` lemmas and the definition, ``"noun: dog, domestic dog: a
  member of …"`` (stating the part of speech, which every label name starts with, speeds up
  learning: centralized MiniLM LoRA at batch 32, lr 0.005, reached 0.43 / 0.60 validation
  accuracy after 1,600 / 3,200 examples with it, 0.34 / 0.51 without);
* ``wordnet-definitions`` (instruction): ``prompt`` = ``Define the noun "dog".``,
  ``response`` = the definition.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets

WORDNET_DIR_ENV = "FEDLORA_WORDNET_DIR"
DEFAULT_DIR = "/usr/share/wordnet"
INSTALL_COMMAND = "apt-get install -y --no-install-recommends wordnet-base"
SUPERSENSES = "wordnet-supersenses"
DEFINITIONS = "wordnet-definitions"
#: part of speech -> its data file's suffix
POS_FILES = {"noun": "noun", "verb": "verb", "adj": "adj", "adv": "adv"}
#: lexicographer file names by lex_filenum (lexnames(5WN))
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
MAX_LEMMAS = 3
_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    """One synset: its part of speech, supersense, lemmas (spaces restored) and the definition part of its gloss."""

    pos: str
    lexname: str
    lemmas: tuple[str, ...]
    definition: str


def wordnet_dir() -> Path:
    """``$FEDLORA_WORDNET_DIR`` or ``/usr/share/wordnet``."""
    return Path(os.environ.get(WORDNET_DIR_ENV) or DEFAULT_DIR)


def parse_line(line: str, pos: str) -> Synset:
    """The synset of one data-file line (see the module docstring); ValueError on a malformed line."""
    fields, bar, gloss = line.partition(" | ")
    parts = fields.split()
    if not bar or len(parts) < 6:
        raise ValueError(f"not a WordNet synset line: {line[:80]!r}")
    lex_filenum, count = int(parts[1]), int(parts[3], 16)
    if not 0 <= lex_filenum < len(LEXNAMES):
        raise ValueError(f"lex_filenum {lex_filenum} is not one of the {len(LEXNAMES)} lexicographer files: {line[:80]!r}")
    words = parts[4 : 4 + 2 * count : 2]
    lemmas = tuple(dict.fromkeys(_MARKER.sub("", w).replace("_", " ") for w in words))
    definition = gloss.strip().partition('; "')[0].strip().rstrip(";").strip()
    return Synset(pos=pos, lexname=LEXNAMES[lex_filenum], lemmas=lemmas, definition=definition)


@lru_cache(maxsize=2)
def read_synsets(directory: Path) -> tuple[Synset, ...]:
    """Every synset of the four data files in ``directory`` (noun, verb, adj, adv; file order).

    A missing file is a one-line ``FileNotFoundError`` with the command that installs the package.
    """
    synsets: list[Synset] = []
    for pos, suffix in POS_FILES.items():
        path = directory / f"data.{suffix}"
        if not path.is_file():
            raise FileNotFoundError(f"WordNet data file {path} not found: the wordnet datasets need Debian's wordnet-base "
                               f"package; install it with `{INSTALL_COMMAND}` (make experiments-setup does), or "
                               f"point ${WORDNET_DIR_ENV} at a directory holding data.noun/verb/adj/adv")
        with open(path, encoding="utf-8", errors="replace") as fh:
            synsets += [parse_line(line, pos) for line in fh if line.strip() and not line.startswith("  ")]
    return tuple(synsets)


def classification_text(synset: Synset) -> str:
    """``"pos: lemma, lemma: definition"`` with at most :data:`MAX_LEMMAS` lemmas."""
    return f"{synset.pos}: {', '.join(synset.lemmas[:MAX_LEMMAS])}: {synset.definition}"


def definition_prompt(synset: Synset) -> str:
    """``Define the noun "dog".`` (the synset's first lemma)."""
    return f'Define the {synset.pos} "{synset.lemmas[0]}".'


def load_wordnet(name: str) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The built-in dataset ``name`` (:data:`SUPERSENSES` or :data:`DEFINITIONS`) and its label names.

    Labels are the supersenses present, in lex_filenum order (all 45 for WordNet 3.0);
    the definitions task has none.
    """
    synsets = read_synsets(wordnet_dir())
    topics = [s.lexname for s in synsets]
    pos = [s.pos for s in synsets]
    if name == DEFINITIONS:
        return datasets.Dataset.from_dict({"prompt": [definition_prompt(s) for s in synsets],
                                           "response": [s.definition for s in synsets], "topic": topics, "pos": pos}), ()
    if name != SUPERSENSES:
        raise ValueError(f"{name!r} is not a WordNet dataset; expected {SUPERSENSES!r} or {DEFINITIONS!r}")
    present = set(topics)
    labels = tuple(n for n in LEXNAMES if n in present)
    index = {n: i for i, n in enumerate(labels)}
    return datasets.Dataset.from_dict({"text": [classification_text(s) for s in synsets],
                                       "label": [index[t] for t in topics], "topic": topics, "pos": pos}), labels
