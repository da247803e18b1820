"""Is the app a task carries this installed fedlora? The only code fedlora's runners ever run is the installed one.

A Flower task carries an app bundle (FAB: a zip of the submitter's ``pyproject.toml`` and
sources). fedlora's runners never install or import anything from it; they serve the task
with the installed package, and only when the FAB is exactly that package:

1. ``[project]`` ``name`` is ``fedlora`` and ``version`` the installed version;
2. ``[tool.flwr.app]`` ``publisher`` is ``fedlora`` and its ``components`` are the installed
   ServerApp and ClientApp (:data:`COMPONENTS`);
3. ``[tool.flwr.app.config]`` holds exactly the installed run-config keys with their
   defaults (so server and sites agree on every value a run does not override);
4. its Python files are exactly the installed package's ``fedlora/**/*.py``, each
   byte-identical (SHA-256); any other Python file, anywhere in the bundle, refuses it.

``pyproject.toml`` builds FABs that hold only ``fedlora/**/*.py`` (``fab-include``), so a
submitter with the same release passes, and any change to the code — a patched module,
an extra file, another app — is refused with a :class:`ForeignApp` that names the app it
got and the fedlora version installed.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict

from fedlora.run_config import full_defaults

NAME = "fedlora"
PUBLISHER = "fedlora"
COMPONENTS = {"serverapp": "fedlora.server.app:app", "clientapp": "fedlora.client.app:app"}
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class ForeignApp(RuntimeError):
    """A task's app is not this installed fedlora; the message names the app and the installed version."""


@dataclass(frozen=True)
class AppIdentity:
    """What identifies an app: its declared name, version, publisher, components, config, and its sources' hashes."""

    name: str
    version: str
    publisher: str
    components: dict[str, str]
    config: dict[str, Any]
    sources: dict[str, str]

    def label(self) -> str:
        return f"{self.name!r} {self.version} (publisher {self.publisher!r}, components {self.components})"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@cache
def installed_app() -> AppIdentity:
    """This process's fedlora: package metadata, its app components and config, ``fedlora/**/*.py`` hashes.

    Computed once per process — a runner calls it at start, so a package changed on disk
    later (the runner still runs the code it imported) does not pass for the running one.
    """
    sources = {path.relative_to(PACKAGE_DIR.parent).as_posix(): _sha256(path.read_bytes())
               for path in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in path.parts}
    return AppIdentity(NAME, version(NAME), PUBLISHER, dict(COMPONENTS), full_defaults(), sources)


def fab_app(content: bytes) -> AppIdentity:
    """The identity a FAB declares and carries; :class:`ForeignApp` when it is not a readable Flower app bundle."""
    try:
        bundle = zipfile.ZipFile(io.BytesIO(content))
        project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
        sources = {name: _sha256(bundle.read(name)) for name in bundle.namelist() if name.endswith(".py")}
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ForeignApp(f"refused an unreadable app bundle ({err}); this runner serves only the installed "
                         f"fedlora {installed_app().version}") from err
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    return AppIdentity(str(project.get("project", {}).get("name", "?")), str(project.get("project", {}).get("version", "?")),
                       str(app.get("publisher", "?")), dict(app.get("components", {})),
                       flatten_dict(app.get("config", {})), sources)


def differences(got: AppIdentity, installed: AppIdentity) -> list[str]:
    """What keeps ``got`` from being ``installed`` (empty: the same app)."""
    problems = []
    for field in ("name", "version", "publisher", "components"):
        if getattr(got, field) != getattr(installed, field):
            problems.append(f"{field} {getattr(got, field)!r} is not {getattr(installed, field)!r}")
    if got.config != installed.config:
        changed = sorted(k for k in set(got.config) | set(installed.config) if got.config.get(k) != installed.config.get(k))
        problems.append(f"run-config defaults differ in {changed[:5]}")
    extra = sorted(set(got.sources) - set(installed.sources))
    missing = sorted(set(installed.sources) - set(got.sources))
    changed = sorted(k for k in set(got.sources) & set(installed.sources) if got.sources[k] != installed.sources[k])
    for what, files in (("Python files the installed package lacks", extra), ("missing installed files", missing),
                        ("Python files that differ from the installed ones", changed)):
        if files:
            problems.append(f"{what}: {files[:5]}{' …' if len(files) > 5 else ''}")
    return problems


def check_app(content: bytes) -> None:
    """Return when the FAB ``content`` is the installed fedlora (see the module docstring); else :class:`ForeignApp`."""
    installed = installed_app()
    got = fab_app(content)
    problems = differences(got, installed)
    if problems:
        raise ForeignApp(f"refused app {got.label()}: {'; '.join(problems)}; this runner serves only the installed "
                         f"fedlora {installed.version}")
