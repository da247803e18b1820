"""``fedlora run``: check the run, run it as a ``flwr run`` simulation on an isolated local SuperLink, judge it.

``python -m fedlora.runtime.launch`` (what ``make run`` calls) is the same command. In order:

1. **Pre-flight** (:mod:`fedlora.runtime.preflight`): every key, value, data file and model
   name is checked before any Flower, SuperLink or Ray process starts; a problem is one line
   on stderr and exit code 2, in seconds (``--debug`` adds the traceback).
2. **SuperLink** (:mod:`fedlora.runtime.superlink`): started by the launcher in its own
   ``FLWR_HOME`` on free ports, with ``--superlink-timeout`` seconds to come up.
3. **Run**: ``flwr run <project> --stream``; the console shows fedlora's lines (progress,
   rounds, the end table; :mod:`fedlora.console`), ``--verbose`` everything. ``flwr run``
   exits 0 even when the run fails: the run's real status comes from ``flwr ls``.
4. **Clean-up**: every process the launch started — SuperLink, ``flwr-simulation``, Ray —
   carries a marker in its environment and is stopped at the end, and on SIGINT/SIGTERM
   (:mod:`fedlora.runtime.processes`). The full output is kept as ``launch.log`` in the run
   directory; when a run fails, its ``FLWR_HOME`` (launch log, SuperLink logs) is kept and named.

``--ray-address`` runs the simulation's clients on an existing Ray cluster (Flower's multi-node
simulation): ``flwr-simulation`` connects to it through ``RAY_ADDRESS`` instead of starting Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.console import error_line, quiet_environment, shown
from fedlora.runtime.processes import MARKER, Interrupted, interruptible, stop_marked
from fedlora.runtime.superlink import SuperLinkStartError, start_local_superlink

PROJECT_DIR = Path(__file__).resolve().parents[2]
COMPLETED = "finished:completed"
LAUNCH_LOG = "launch.log"
#: seconds the local SuperLink gets to come up (Flower's own start gives it 15)
SUPERLINK_TIMEOUT = 120.0


@dataclass
class LaunchResult:
    run_id: int | None
    status: str
    run_dir: Path | None
    output: str
    #: the run's status details (why it failed), from ``flwr ls``
    details: str = ""
    #: the full output of the launch, where it was kept
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal for ``--run-config`` (text in single quotes, or double quotes if it has one)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' in text or "\\" in text:
        raise ValueError(f"run-config value {text!r} holds both quote characters (or a backslash): Flower cannot pass it")
    return f'"{text}"'


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


def run_status(run_id: int, env: dict[str, str], project_dir: Path) -> tuple[str, str]:
    """The run's real status (``finished:completed`` …) and its status details, from ``flwr ls``."""
    out = subprocess.run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], env=env, cwd=project_dir,
                         capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return f"unknown ({out.stdout.strip()[-200:]} {out.stderr.strip()[-200:]})", ""
    return (runs[0]["status"], runs[0].get("status-details", "")) if runs else ("unknown (run not listed)", "")


def _stream(proc: subprocess.Popen, log, echo: bool, verbose: bool, deadline: float | None) -> list[str]:
    """Every line of ``proc``'s output, written to ``log`` and (``echo``) the console: fedlora's lines, or all."""
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        log.write(line)
        log.flush()
        if echo and (verbose or shown(line)):
            sys.stdout.write(line)
            sys.stdout.flush()
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            break
    proc.wait()
    return lines


def run_simulation(overrides: dict[str, Any] | None = None, *, num_supernodes: int = 2, cpus_per_client: int = 2,
                   project_dir: Path = PROJECT_DIR, flwr_home: Path | None = None, timeout: float | None = 3600,
                   echo: bool = True, verbose: bool = False, superlink_timeout: float = SUPERLINK_TIMEOUT,
                   ray_address: str | None = None) -> LaunchResult:
    """``flwr run <project> --stream`` with ``overrides``; returns the run's real status and directory.

    ``timeout`` (seconds, None = none) bounds the run; ``echo`` prints fedlora's lines of the
    output (all of them with ``verbose``; otherwise the third-party loggers are also turned down
    at their source). Every process started here is stopped before this returns, also when it
    is interrupted (KeyboardInterrupt, :class:`~fedlora.runtime.processes.Interrupted`).
    """
    own_home = flwr_home is None
    flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="fedlora-flwr-home-"))
    flwr_home.mkdir(parents=True, exist_ok=True)
    marker = secrets.token_hex(8)
    env = {**flower_env(flwr_home, project_dir), MARKER: marker, **({"RAY_ADDRESS": ray_address} if ray_address else {})}
    if not verbose:
        env = quiet_environment(env, os.environ)
    cmd = ["flwr", "run", str(project_dir), "--stream",
           "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
    if overrides:
        cmd += ["--run-config", run_config_arg(overrides)]
    log_path = flwr_home / LAUNCH_LOG
    output, run_id, status, details = "", None, "not started", ""
    try:
        with open(log_path, "w") as log:
            try:
                start_local_superlink(env, flwr_home, superlink_timeout)
            except SuperLinkStartError as err:
                details = str(err)
                log.write(details + "\n")
            else:
                proc = subprocess.Popen(cmd, env=env, cwd=project_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                output = "".join(_stream(proc, log, echo, verbose, time.monotonic() + timeout if timeout else None))
                match = re.search(r"Successfully started run (\d+)", output)
                run_id = int(match.group(1)) if match else None
                if run_id is not None:
                    status, details = run_status(run_id, env, project_dir)
    finally:
        left = stop_marked(MARKER, marker)
        if left:
            _error(f"{len(left)} process(es) of the launch still running after SIGKILL: pid {', '.join(map(str, left))}")
    dirs = re.findall(r"\[fedlora\] run directory: (\S+)", output)
    run_dir = Path(dirs[-1]) if dirs else None
    kept = log_path
    if run_dir is not None and run_dir.is_dir():
        kept = Path(shutil.copy(log_path, run_dir / LAUNCH_LOG))
    if own_home and status == COMPLETED:
        shutil.rmtree(flwr_home, ignore_errors=True)
    return LaunchResult(run_id=run_id, status=status, run_dir=run_dir, output=output, details=details,
                        log=kept if kept.exists() else None)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Check a run's config, data and model, run it as a Flower simulation, report whether "
                               "it completed. Overrides are run-config keys (pyproject.toml [tool.flwr.app.config]).",
        epilog="example: fedlora run num-server-rounds=3 strategy=flora partition.kind=dirichlet partition.alpha=0.1")
    parser.add_argument("--num-supernodes", type=int, default=4, help="simulated clients (default 4)")
    parser.add_argument("--cpus-per-client", type=int, default=2,
                        help="CPU cores Ray reserves per simulated client (default 2)")
    parser.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME to use (default: a fresh temp dir)")
    parser.add_argument("--superlink-timeout", type=float, default=SUPERLINK_TIMEOUT,
                        help=f"seconds the local SuperLink gets to start, per attempt (default {SUPERLINK_TIMEOUT:g})")
    parser.add_argument("--ray-address", default=None,
                        help="run the clients on this existing Ray cluster (HOST:PORT of `ray start --head`)")
    parser.add_argument("--timeout", type=float, default=0, help="stop the run after this many seconds (default: never)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's, Ray's and transformers' output too")
    parser.add_argument("--debug", action="store_true", help="like --verbose, and a traceback with a pre-flight error")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="run-config overrides, e.g. lora.rank=4 model.name=tiny-bert (TOML values; text may "
                             "go unquoted)")
    return parser


def _error(message: str) -> None:
    print(f"fedlora: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, prog: str = "fedlora run") -> int:
    """The ``fedlora run`` command (see the module docstring); its exit code."""
    from fedlora.runtime.preflight import PreflightError, preflight

    args = build_parser(prog).parse_args(argv)
    if not (args.verbose or args.debug):
        warnings.simplefilter("ignore")  # the pre-flight's own imports (transformers, peft): as quiet as the run
    try:
        plan = preflight(args.overrides, args.num_supernodes, args.cpus_per_client, args.ray_address)
    except PreflightError as err:
        if args.debug:
            traceback.print_exc()
        for problem in err.problems:
            _error(problem)
        return 2
    for note in plan.notes:
        print(f"[fedlora] {note}", flush=True)
    try:
        with interruptible():
            result = run_simulation(plan.overrides, num_supernodes=args.num_supernodes,
                                    cpus_per_client=args.cpus_per_client, flwr_home=args.flwr_home,
                                    timeout=args.timeout or None, verbose=args.verbose or args.debug,
                                    superlink_timeout=args.superlink_timeout, ray_address=args.ray_address)
    except Interrupted as stop:
        _error(f"stopped by {stop}")
        return 128 + stop.signum
    print(f"[fedlora] run {result.run_id} status: {result.status}", flush=True)
    print(f"[fedlora] run directory: {result.run_dir}", flush=True)
    if not result.ok:
        _error(error_line(result.output) or result.details or f"the run ended with status {result.status}")
        if result.log:
            _error(f"full output: {result.log}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m fedlora.runtime.launch"))
