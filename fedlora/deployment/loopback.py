"""The secure deployment of ``docker-compose.yml`` as local processes on 127.0.0.1 (no Docker needed).

:class:`LoopbackFederation` starts one ``flower-superlink`` (TLS, SuperNode authentication,
every API on a free loopback port, state in a file) with the runner that runs ServerApps
(``fedlora serverapp-runner``, or Flower's ``flower-superexec`` with ``runner="flower"``),
registers SuperNode keys, starts SuperNodes each with their own runner,
submits a run with ``flwr run <project> <connection>`` and judges it by ``flwr ls``, never
by ``flwr run``'s exit code. Argument lists come from :mod:`fedlora.deployment.commands`, the
same source ``docker-compose.yml`` is rendered from. Every process is started in its own
process group and stopped by PID when the federation closes. Nothing binds anything but
127.0.0.1. Used by ``tests/test_deployment.py`` and ``benchmarks/deployment_overhead.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedlora.deployment.commands import (
    LOOPBACK,
    Credentials,
    SiteCredentials,
    clientapp_runner_args,
    connection_toml,
    serverapp_runner_args,
    site_args,
    superexec_args,
    superlink_args,
    supernode_args,
)
from fedlora.deployment.registration import register_key
from fedlora.runtime.launch import PROJECT_DIR, LaunchResult, flower_env, free_port, run_config_arg, run_status

CONNECTION = "loopback"
#: which runners serve the apps: fedlora's persistent ones, or Flower's SuperExec (a process per task)
RUNNERS = ("fedlora", "flower")


@dataclass
class Process:
    """A started Flower process: its name, handle and log file (stdout + stderr)."""

    name: str
    popen: subprocess.Popen
    log: Path

    def exit_code(self, timeout: float) -> int | None:
        """The exit code once the process ends within ``timeout`` seconds, else ``None``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f} s")


class LoopbackFederation:
    """A SuperLink + SuperExec on loopback; add SuperNodes, then :meth:`run` jobs. Use as a context manager.

    ``credentials_dir`` holds ``deploy/make_certs.sh`` output (its certificate must name
    127.0.0.1 or localhost, the default). All state, logs and ``FLWR_HOME`` go under ``workdir``.
    """

    def __init__(self, workdir: Path, credentials_dir: Path, project_dir: Path = PROJECT_DIR, runner: str = "fedlora") -> None:
        if runner not in RUNNERS:
            raise ValueError(f"runner {runner!r} is not one of {RUNNERS}")
        self.runner = runner
        self.workdir = Path(workdir)
        self.credentials = Credentials(str(Path(credentials_dir).resolve()))
        self.project_dir = project_dir
        self.env = flower_env(self.workdir / "flwr-home", project_dir)
        self.env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)  # keep the Control API on the HTTP port only
        self.processes: list[Process] = []
        self.http_port = free_port()
        self.fleet_port = free_port()
        self.fleet_address = f"{LOOPBACK}:{self.fleet_port}"
        #: SuperNode name -> its Runtime API port (where its runner attaches) and its credentials
        self.node_ports: dict[str, int] = {}
        self.node_credentials: dict[str, SiteCredentials | None] = {}
        #: Flower's gRPC health server of the SuperLink (what the compose healthcheck probes)
        self.superlink_health = f"{LOOPBACK}:{free_port()}"

    def __enter__(self) -> "LoopbackFederation":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, name: str) -> str:
        """Everything process ``name`` wrote (a restarted process appends to the same log)."""
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def spawn(self, name: str, argv: list[str]) -> Process:
        """Start ``argv`` as process ``name`` (own process group, log in ``logs/<name>.log``, stopped on close)."""
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            popen = subprocess.Popen(argv, env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def _flwr(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.project_dir, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, timeout: float = 60) -> None:
        """Start the SuperLink and its ServerApp runner; write the ``flwr`` connection; wait until they listen."""
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            connection_toml(CONNECTION, f"{LOOPBACK}:{self.http_port}", self.credentials.ca_cert))
        self.spawn("superlink", ["flower-superlink", *superlink_args(
            host=LOOPBACK, port=self.http_port, fleet_address=self.fleet_address,
            database=str(self.workdir / "superlink-state.db"), credentials=self.credentials,
            health_address=self.superlink_health)])
        _wait_for_port(self.http_port, timeout)
        _wait_for_port(self.fleet_port, timeout)
        self.start_server_runner(self.runner)

    def start_server_runner(self, runner: str, *, with_secret: bool = True, name: str = "serverapp-runner") -> Process:
        """The process that runs ServerApps: ``fedlora serverapp-runner`` or (``"flower"``) ``flower-superexec``.

        ``with_secret=False`` starts one without the SuperLink's SuperExec secret (a rogue runner).
        """
        address = f"{LOOPBACK}:{self.http_port}"
        secret = self.credentials.superlink_secret if with_secret else None
        if runner == "flower":
            return self.spawn(name, ["flower-superexec", *superexec_args(
                runtime_address=address, ca_cert=self.credentials.ca_cert, secret=secret)])
        return self.spawn(name, ["fedlora", *serverapp_runner_args(
            runtime_address=address, ca_cert=self.credentials.ca_cert, secret=secret)])

    def start_site_runner(self, name: str) -> Process:
        """The process that runs SuperNode ``name``'s ClientApps (``fedlora clientapp-runner`` or Flower's SuperExec)."""
        address = f"{LOOPBACK}:{self.node_ports[name]}"
        credentials = self.node_credentials[name]
        secret = credentials.secret if credentials else None
        if self.runner == "flower":
            return self.spawn(f"{name}-runner", ["flower-superexec", *superexec_args(
                runtime_address=address, ca_cert=None, secret=secret)])
        return self.spawn(f"{name}-runner", ["fedlora", *clientapp_runner_args(runtime_address=address, secret=secret)])

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
        """Send ``sig`` to process ``name``'s group; its exit code (None if it outlives ``grace``). It is forgotten."""
        process = next(p for p in self.processes if p.name == name)
        try:
            os.killpg(process.popen.pid, sig)
        except ProcessLookupError:
            pass
        code = process.exit_code(grace)
        if code is not None:
            self.processes.remove(process)
        return code

    def register(self, key_index: int) -> str:
        """Register SuperNode key pair ``key_index`` with the SuperLink; return the node id it was given."""
        node_id = register_key(self.credentials.node_public_key(key_index), CONNECTION, self.env, self.project_dir)
        if node_id is None:
            raise RuntimeError(f"key {key_index} was registered already")
        return node_id

    def start_supernode(self, name: str, node_config: Mapping[str, str | int | float], *, key_index: int | None,
                        secure: bool = True, max_retries: int | None = None, with_runner: bool = True) -> Process:
        """Start a SuperNode (and, by default, the runner of its ClientApps) on fresh loopback ports.

        ``secure=False`` starts it with ``--insecure`` (no TLS, no key) against this TLS
        SuperLink, which must fail; ``key_index`` names its authentication key pair.
        """
        if secure and key_index is None:
            raise ValueError("a secure SuperNode needs key_index: the number of its authentication key pair")
        self.node_ports[name] = free_port()
        credentials = self.node_credentials[name] = self.credentials.site(key_index) if secure else None
        node = self.spawn(name, ["flower-supernode", *supernode_args(
            superlink=self.fleet_address, host=LOOPBACK, port=self.node_ports[name], node_config=node_config,
            credentials=credentials, max_retries=max_retries)])
        if with_runner:
            self.start_site_runner(name)
        return node

    def start_site(self, name: str, node_config: Mapping[str, str | int | float], *, key_index: int) -> Process:
        """Start a whole site with the one command ``fedlora site`` (its SuperNode and its runner, one process group)."""
        self.node_ports[name] = free_port()
        credentials = self.node_credentials[name] = self.credentials.site(key_index)
        return self.spawn(name, ["fedlora", *site_args(superlink=self.fleet_address, node_config=node_config,
                                                        credentials=credentials, runtime_port=self.node_ports[name])])

    def kill_supernode(self, name: str) -> None:
        """SIGKILL SuperNode ``name`` and its runner (with the app processes it launched): a machine that died."""
        for process in self.processes:
            if process.name in (name, f"{name}-runner"):
                try:
                    os.killpg(process.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.exit_code(10)

    def runs(self) -> list[dict[str, Any]]:
        """Every run the SuperLink knows (``flwr ls``), oldest first."""
        out = self._flwr(["ls", CONNECTION, "--format", "json"])
        try:
            return sorted(json.loads(out.stdout)["runs"], key=lambda r: r.get("pending-at", ""))
        except (json.JSONDecodeError, KeyError):
            return []

    def online_nodes(self) -> set[str]:
        """Ids of the SuperNodes the SuperLink currently sees online."""
        out = self._flwr(["supernode", "list", CONNECTION, "--format", "json"])
        try:
            nodes = json.loads(out.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return set()
        return {n["node-id"] for n in nodes if n["status"] == "online"}

    def wait_online(self, node_ids: set[str], timeout: float = 90) -> None:
        """Block until every node in ``node_ids`` is online (so round 1 samples all of them)."""
        deadline = time.monotonic() + timeout
        while not node_ids <= self.online_nodes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperNodes {sorted(node_ids - self.online_nodes())} not online after {timeout:.0f} s")
            time.sleep(1.0)

    def run(self, overrides: Mapping[str, Any], timeout: float = 600, project_dir: Path | None = None) -> LaunchResult:
        """``flwr run <project> <connection> --stream`` with ``overrides``; status from ``flwr ls``.

        ``project_dir`` submits another app than this project (default: fedlora itself).
        """
        cmd = ["flwr", "run", str(project_dir or self.project_dir), CONNECTION, "--stream"]
        if overrides:
            cmd += ["--run-config", run_config_arg(dict(overrides))]
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.project_dir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        status, details = run_status(run_id, self.env, self.project_dir) if run_id is not None else ("not started", "")
        dirs = re.findall(r"\[fedlora\] run directory: (\S+)", output)
        return LaunchResult(run_id=run_id, status=status, run_dir=Path(dirs[-1]) if dirs else None, output=output,
                            details=details)

    def close(self, grace: float = 10.0) -> None:
        """Stop every process this federation started, newest first: SIGTERM, then SIGKILL to its whole group.

        Each process leads its own process group, which also holds the app processes a
        SuperExec launched, so nothing it started outlives the federation.
        """
        for process in reversed(self.processes):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.popen.pid, sig)
                except ProcessLookupError:
                    pass
                process.exit_code(grace)
        self.processes.clear()
