"""The import rules of the layout, checked in fresh interpreters: no upward imports, the client never imports server code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedlora.strategies.registry import names

SERVER_SIDE = ("fedlora.server", "fedlora.privacy.user_level", "fedlora.runtime", "fedlora.deployment")


def imported_after(code: str) -> list[str]:
    """The fedlora modules loaded in a fresh interpreter after running ``code``."""
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('fedlora'))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_client_never_imports_server_code():
    code = ("import fedlora.client.app\nfrom fedlora.strategies.registry import strategies\n"
            "[spec.client_role() for spec in strategies().values()]")
    loaded = imported_after(code)
    assert {f"fedlora.strategies.{name}" for name in names()} <= set(loaded), "every client part was loaded"
    offenders = [m for m in loaded if m.startswith(SERVER_SIDE) or m.endswith(".server")]
    assert not offenders, f"client-side imports pulled in server code: {offenders}"


def test_config_knows_nothing_of_the_registries():
    assert imported_after("import fedlora.config") == ["fedlora", "fedlora.config"]


@pytest.mark.parametrize("name", names())
def test_a_strategy_registers_without_importing_either_part(name):
    loaded = imported_after(f"import fedlora.strategies.{name}")
    parts = [m for m in loaded if m.startswith(f"fedlora.strategies.{name}.")]
    assert parts == [], f"registering {name} imported {parts}"
