"""Can a Hugging Face hub repository be loaded here? In the local cache, or reachable on the hub.

The launcher's pre-flight asks this for ``model.name`` and ``dataset.name`` hub ids, so a run
without hub access fails in seconds with one line instead of a download traceback minutes later.
Without hub access (``HF_HUB_OFFLINE=1``, or the hub does not answer within
:data:`PROBE_SECONDS`) only cached repositories can load.
"""

from __future__ import annotations

import os
from pathlib import Path

#: seconds the pre-flight waits for the hub before it treats it as unreachable
PROBE_SECONDS = 10.0
NO_ACCESS = {"model": "no hub access: set HF_HUB_OFFLINE=0 or use a local path/embedded model",
             "dataset": "no hub access: set HF_HUB_OFFLINE=0 or use a local file/embedded dataset"}
#: variables that turn hub access off, per repository type (any of them set to 1/true/yes/on)
OFFLINE_VARIABLES = {"model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                     "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}


def hub_offline(repo_type: str) -> bool:
    """Whether the environment turns hub access off for ``repo_type`` ('model' or 'dataset')."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES[repo_type])


def cached(repo_id: str, repo_type: str) -> bool:
    """Whether the hub cache (or, for datasets, the ``datasets`` cache) holds a snapshot of ``repo_id``."""
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if repo_type == "dataset":
        from datasets.config import HF_DATASETS_CACHE

        return (Path(HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()
    return False


def hub_access_problem(repo_id: str, repo_type: str) -> str | None:
    """Why ``repo_id`` cannot be loaded here (one clause), or None when it is cached or found on the hub."""
    if cached(repo_id, repo_type):
        return None
    if hub_offline(repo_type):
        return f"it is not in the local Hugging Face cache and there is {NO_ACCESS[repo_type]}"
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=PROBE_SECONDS)
    except GatedRepoError:
        return None  # it exists; downloading it needs a token with access, which the load reports itself
    except RepositoryNotFoundError:
        return (f"there is no {repo_type} {repo_id!r} on the Hugging Face hub (a private one needs "
                "`hf auth login` or HF_TOKEN)")
    except (OSError, httpx.HTTPError, HfHubHTTPError, OfflineModeIsEnabled) as err:
        return f"the hub did not answer ({type(err).__name__}) and it is not cached: {NO_ACCESS[repo_type]}"
    return None
