"""Run the fedlora app as a ``flwr run`` simulation on an isolated local SuperLink, and judge it.

``flwr run`` exits 0 even when the run fails, and leaves its detached local SuperLink
running. :func:`run_simulation` gives each launch its own ``FLWR_HOME`` and free ports,
streams the run's output, reads the run's real status with ``flwr ls``, and always stops
the SuperLink it started (by PID). ``python -m fedlora.runtime.launch`` is what ``make run`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[2]
COMPLETED = "finished:completed"


@dataclass
class LaunchResult:
    run_id: int | None
    status: str
    run_dir: Path | None
    output: str
    #: the run's status details (why it failed), from ``flwr ls``
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def run_config_arg(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, project_dir: Path) -> dict[str, str]:
    """Environment for an isolated local SuperLink (see DESIGN.md, Flower 1.39 facts)."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FEDLORA_PROJECT_DIR": str(project_dir),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        "PYTHONWARNINGS": env.get("PYTHONWARNINGS", "ignore::FutureWarning"),
    })
    return env


def _superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of ``flower-superlink`` processes whose database lives in ``flwr_home``."""
    marker = str(flwr_home / "local-superlink")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_superlink(flwr_home: Path, grace: float = 10.0) -> None:
    """Terminate the local SuperLink of ``flwr_home`` and its process group (simulation workers)."""
    for pid in _superlink_pids(flwr_home):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.2)
            if not Path(f"/proc/{pid}").exists():
                break


def run_status(run_id: int, env: dict[str, str], project_dir: Path) -> tuple[str, str]:
    """The run's real status (``finished:completed`` …) and its status details, from ``flwr ls``."""
    out = subprocess.run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], env=env, cwd=project_dir,
                         capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return f"unknown ({out.stdout.strip()[-200:]} {out.stderr.strip()[-200:]})", ""
    return (runs[0]["status"], runs[0].get("status-details", "")) if runs else ("unknown (run not listed)", "")


def run_simulation(overrides: dict[str, Any] | None = None, *, num_supernodes: int = 2, cpus_per_client: int = 2,
                   project_dir: Path = PROJECT_DIR, flwr_home: Path | None = None, timeout: float = 3600,
                   echo: bool = True) -> LaunchResult:
    """``flwr run <project> --stream`` with ``overrides``; returns the run's real status and directory."""
    own_home = flwr_home is None
    flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="fedlora-flwr-home-"))
    env = flower_env(flwr_home, project_dir)
    cmd = ["flwr", "run", str(project_dir), "--stream",
           "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
    if overrides:
        cmd += ["--run-config", run_config_arg(overrides)]
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=project_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
        output = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        status, details = run_status(run_id, env, project_dir) if run_id is not None else ("not started", "")
    finally:
        stop_superlink(flwr_home)
        if own_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    dirs = re.findall(r"\[fedlora\] run directory: (\S+)", output)
    return LaunchResult(run_id=run_id, status=status, run_dir=Path(dirs[-1]) if dirs else None, output=output,
                        details=details)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run fedlora as a Flower simulation and report whether it completed.")
    parser.add_argument("--num-supernodes", type=int, default=4, help="simulated clients (default 4)")
    parser.add_argument("--cpus-per-client", type=int, default=2, help="CPU cores reserved per simulated client")
    parser.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME to use (default: a fresh temp dir)")
    parser.add_argument("overrides", nargs="*", help="run-config overrides as key=value (TOML values)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, _, raw = item.partition("=")
        overrides[key] = json.loads(raw) if re.fullmatch(r"-?[\d.eE+-]+|true|false", raw) else raw.strip("'\"")
    result = run_simulation(overrides, num_supernodes=args.num_supernodes, cpus_per_client=args.cpus_per_client,
                            flwr_home=args.flwr_home)
    print(f"[fedlora] run {result.run_id} status: {result.status}")
    print(f"[fedlora] run directory: {result.run_dir}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
