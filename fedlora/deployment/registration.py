"""Registering sites' public keys with a SuperLink, idempotently (what a compose start waits for).

``flwr supernode register`` refuses a key that is already registered (``[code: 23] Public
key already in use.``); here that counts as done, so registration can run on every start
of a deployment and the SuperNodes start only once their keys are known — instead of
crash-looping until an operator registers them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from fedlora.deployment.commands import connection_toml, register_args

ALREADY_REGISTERED = "[code: 23]"
CONNECTION = "superlink"


def register_key(public_key: str, connection: str, env: dict[str, str], cwd: Path | None = None) -> str | None:
    """Register ``public_key`` through ``connection`` (in ``env``'s ``FLWR_HOME``); its node id, or None if it was
    registered already. Any other refusal is a ``RuntimeError`` with flwr's answer."""
    out = subprocess.run(["flwr", *register_args(public_key, connection)], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    try:
        answer = json.loads(out.stdout)
    except json.JSONDecodeError as err:
        raise RuntimeError(f"registering {public_key} failed: {out.stdout[-500:]} {out.stderr[-500:]}") from err
    if answer.get("success"):
        return str(answer["node-id"])
    if ALREADY_REGISTERED in answer.get("error-message", ""):
        return None
    raise RuntimeError(f"registering {public_key} failed: {answer.get('error-message', answer)}")


def register_sites(control_api: str, ca_cert: str | None, public_keys: list[str]) -> list[str | None]:
    """Register every key with the SuperLink whose Control API is ``control_api``; node ids (None: already known)."""
    with tempfile.TemporaryDirectory(prefix="fedlora-register-") as home:
        cert = str(Path(ca_cert).resolve()) if ca_cert else None
        Path(home, "config.toml").write_text(connection_toml(CONNECTION, control_api, cert))
        env = {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        return [register_key(key, CONNECTION, env) for key in public_keys]
