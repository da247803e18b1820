"""Start the local SuperLink that ``flwr run`` uses, with a start timeout that suits a loaded machine.

``flwr run`` starts a local SuperLink itself when none answers on its HTTP port within 0.4 s,
and gives it 15 s — too little on a busy 2-core machine. The launcher starts the same
SuperLink first (the command Flower 1.39's ``flwr.cli.local_superlink`` runs), waits up to
``timeout`` seconds for its health endpoint, retries ``attempts`` times, and leaves its log
where the caller keeps it. It then names it as the default connection of ``$FLWR_HOME``
(an explicit address, which ``flwr`` uses as it is), so ``flwr run`` and ``flwr ls`` never
probe for it or start another.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from fedlora.deployment.commands import connection_toml

#: seconds between health probes while the SuperLink starts
PROBE_INTERVAL = 0.5


class SuperLinkStartError(RuntimeError):
    """The local SuperLink did not become healthy; the message names its log."""


def superlink_dir(flwr_home: Path) -> Path:
    """Where the local SuperLink of ``flwr_home`` keeps its database and logs (Flower's own layout)."""
    return flwr_home / "local-superlink"


def superlink_command(env: dict[str, str], flwr_home: Path) -> list[str]:
    """The local SuperLink as Flower 1.39 starts it, on the ports ``env`` gives ``flwr``."""
    runtime = superlink_dir(flwr_home)
    return ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
            "--host", "127.0.0.1", "--port", env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"],
            "--log-file", str(runtime / "superlink.log"), "--database", str(runtime / "state.db")]


def healthy(port: str) -> bool:
    """Whether a SuperLink answers on ``http://127.0.0.1:<port>/health``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_local_superlink(env: dict[str, str], flwr_home: Path, timeout: float, attempts: int = 2) -> subprocess.Popen:
    """Start the local SuperLink, wait until it is healthy (``attempts`` tries of ``timeout`` seconds each), and
    make it ``$FLWR_HOME``'s default connection (``config.toml``).

    Its output goes to ``superlink.log`` / ``superlink.console.log`` under :func:`superlink_dir`;
    :class:`SuperLinkStartError` names them when every attempt failed.
    """
    runtime = superlink_dir(flwr_home)
    runtime.mkdir(parents=True, exist_ok=True)
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    reasons = []
    for _ in range(attempts):
        with open(runtime / "superlink.console.log", "ab") as console:
            process = subprocess.Popen(superlink_command(env, flwr_home), env=env, stdin=subprocess.DEVNULL,
                                       stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if healthy(port):
                (flwr_home / "config.toml").write_text(connection_toml("local", f"127.0.0.1:{port}", None))
                return process
            time.sleep(PROBE_INTERVAL)
        if process.poll() is None:
            process.kill()
            reasons.append(f"not healthy within {timeout:g} s")
        else:
            reasons.append(f"exited with code {process.returncode}")
        process.wait()
    raise SuperLinkStartError(f"the local SuperLink did not start ({'; '.join(reasons)}); its logs: "
                              f"{runtime / 'superlink.log'}, {runtime / 'superlink.console.log'} "
                              f"(--superlink-timeout raises the wait)")
