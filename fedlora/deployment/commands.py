"""The command lines of a fedlora deployment (Flower 1.39, grpc-rere Fleet API) — one source of truth.

``docker-compose.yml`` is rendered from these functions (:mod:`fedlora.deployment.compose`) and
the loopback test starts the very same argument lists as local processes
(:mod:`fedlora.deployment.loopback`), so the two cannot drift apart. Every function is pure:
it turns addresses and file paths into the argument list of one Flower executable
(without the executable's name, which is what a container's ``command:`` holds).

Locked down by default: a :class:`Credentials` directory (written by ``deploy/make_certs.sh``)
turns on TLS everywhere and SuperNode authentication; ``credentials=None`` means
``--insecure`` on every link and no node authentication — development only.

Topology, per Flower 1.39:

* ``flower-superlink`` serves Control + Runtime over HTTPS on ``host:port`` and the Fleet
  API (gRPC) on ``fleet_address``; with ``--isolation process`` it runs no app itself.
* ``fedlora serverapp-runner`` beside it connects to that Runtime API and runs each
  ServerApp in one persistent process (the fallback, ``flower-superexec``, starts a fresh
  process per run that installs and runs whatever app bundle it is handed).
* each ``flower-supernode`` connects to the Fleet API, serves its own Runtime API on
  ``host:port`` (loopback only: only its own runner talks to it), and its
  ``fedlora clientapp-runner`` serves every ClientApp message in one persistent process
  (fallback: ``flower-superexec``, a fresh process — torch import, model load — per message).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Mapping

FLWR_VERSION = "1.39.0"
ISOLATION = "process"
LOOPBACK = "127.0.0.1"
CA_CERT = "ca.crt"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SUPERLINK_SECRET = "superlink.secret"


def node_key_name(index: int) -> str:
    """File name of SuperNode ``index``'s private key (1-based, as ``make_certs.sh`` writes it); ``.pub`` is its public key."""
    return f"supernode-{index}"


def node_secret_name(index: int) -> str:
    """File name of the SuperExec secret SuperNode ``index`` shares with its ClientApp runner."""
    return f"supernode-{index}.secret"


@dataclass(frozen=True)
class SiteCredentials:
    """What one site holds (paths): the federation's CA certificate, its SuperNode private key, and the secret
    its SuperNode and ClientApp runner share (None: the runner acquires tasks unsigned)."""

    ca_cert: str
    private_key: str
    secret: str | None = None


@dataclass(frozen=True)
class Credentials:
    """The directory holding ``make_certs.sh`` output, as seen by the process being started."""

    directory: str

    def path(self, name: str) -> str:
        return str(PurePosixPath(self.directory) / name)

    @property
    def ca_cert(self) -> str:
        return self.path(CA_CERT)

    @property
    def server_cert(self) -> str:
        return self.path(SERVER_CERT)

    @property
    def server_key(self) -> str:
        return self.path(SERVER_KEY)

    @property
    def superlink_secret(self) -> str:
        return self.path(SUPERLINK_SECRET)

    def node_private_key(self, index: int) -> str:
        return self.path(node_key_name(index))

    def node_public_key(self, index: int) -> str:
        return self.path(node_key_name(index) + ".pub")

    def site(self, index: int) -> SiteCredentials:
        """What site ``index`` holds of this directory: the CA certificate, its private key and its secret."""
        return SiteCredentials(self.ca_cert, self.node_private_key(index), self.path(node_secret_name(index)))


def _secret(path: str | None) -> list[str]:
    return [] if path is None else ["--superexec-auth-secret-file", path]


def _health(address: str | None) -> list[str]:
    return [] if address is None else ["--health-server-address", address]


def superlink_args(*, host: str, port: int, fleet_address: str, database: str, credentials: Credentials | None,
                   health_address: str | None = None) -> list[str]:
    """``flower-superlink`` arguments: TLS + SuperNode auth + the SuperExec secret (or ``--insecure``), explicit
    addresses, no runtime installs.

    ``host:port`` is the Control + Runtime API (HTTP): bind it to loopback — only the operator
    (over an SSH tunnel) and the ServerApp runner (beside it) may reach it; ``fleet_address``
    is the Fleet API the sites connect to. ``database`` is a file path (SuperLink state
    survives restarts) or ``:flwr-in-memory:``. ``health_address`` starts Flower's gRPC
    health server there (for container healthchecks).
    """
    if credentials is None:
        security = ["--insecure"]
    else:
        security = ["--ssl-ca-certfile", credentials.ca_cert, "--ssl-certfile", credentials.server_cert,
                    "--ssl-keyfile", credentials.server_key, "--enable-supernode-auth",
                    *_secret(credentials.superlink_secret)]
    return [*security, "--isolation", ISOLATION, "--disable-runtime-dependency-installation",
            "--database", database, "--host", host, "--port", str(port), "--fleet-api-address", fleet_address,
            *_health(health_address)]


def superexec_args(*, runtime_address: str, ca_cert: str | None, secret: str | None = None) -> list[str]:
    """``flower-superexec`` arguments (the fallback runner): attach to a Runtime API at ``runtime_address``.

    ``ca_cert`` verifies a TLS Runtime API (the SuperLink's); ``None`` connects without TLS,
    which is only for a Runtime API bound to loopback (a SuperNode's) or development.
    """
    security = ["--insecure"] if ca_cert is None else ["--root-certificates", ca_cert]
    return [*security, "--runtime-api-address", runtime_address, *_secret(secret)]


def serverapp_runner_args(*, runtime_address: str, ca_cert: str | None, secret: str | None = None,
                          health_address: str | None = None) -> list[str]:
    """``fedlora`` arguments of the persistent ServerApp runner attached to the SuperLink's Runtime API.

    ``ca_cert`` verifies the Runtime API's TLS certificate (``None``: no TLS, development);
    ``secret`` is the SuperLink's SuperExec secret file.
    """
    security = [] if ca_cert is None else ["--root-certificates", ca_cert]
    return ["serverapp-runner", "--runtime-api-address", runtime_address, *security, *_secret(secret),
            *_health(health_address)]


def clientapp_runner_args(*, runtime_address: str, device: str | None = None, secret: str | None = None,
                          health_address: str | None = None) -> list[str]:
    """``fedlora`` arguments of a site's persistent ClientApp runner attached to its SuperNode's loopback Runtime API."""
    return ["clientapp-runner", "--runtime-api-address", runtime_address, *(["--device", device] if device else []),
            *_secret(secret), *_health(health_address)]


def health_check(address: str) -> list[str]:
    """A command that exits 0 when the gRPC health server at ``address`` reports SERVING (container healthchecks)."""
    probe = ("import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
             f"sys.exit(g.HealthStub(grpc.insecure_channel('{address}')).Check(h.HealthCheckRequest(), timeout=5)"
             ".status != h.HealthCheckResponse.SERVING)")
    return ["python", "-c", probe]


def parse_node_config(text: str) -> dict[str, str | int | float | bool]:
    """A ``--node-config`` string (``key=value`` pairs, strings TOML-quoted) as a dict."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text])) if text.strip() else {}


def node_config_arg(node_config: Mapping[str, str | int | float]) -> str:
    """``--node-config`` value: ``key=value`` pairs, strings TOML-quoted (``data-path="/data/site.jsonl"``)."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, str):
            if '"' in value or "\\" in value:
                raise ValueError(f"node config {key}={value!r}: quotes and backslashes are not supported")
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def supernode_args(*, superlink: str, host: str, port: int, node_config: Mapping[str, str | int | float],
                   credentials: SiteCredentials | None, max_retries: int | None = None,
                   health_address: str | None = None) -> list[str]:
    """``flower-supernode`` arguments for one site.

    ``superlink`` is the SuperLink's Fleet API address; ``host:port`` this node's Runtime
    API (for its runner: keep it on loopback). With ``credentials``, TLS is verified against
    the CA, the node signs in with its private key, and its runner must hold its secret;
    ``None`` is ``--insecure`` (development only). ``max_retries`` bounds reconnection
    attempts (default: retry forever).
    """
    if credentials is None:
        security = ["--insecure"]
    else:
        security = ["--root-certificates", credentials.ca_cert, "--auth-supernode-private-key", credentials.private_key,
                    *_secret(credentials.secret)]
    retries = [] if max_retries is None else ["--max-retries", str(max_retries)]
    return [*security, "--superlink", superlink, "--isolation", ISOLATION, "--host", host, "--port", str(port),
            *retries, "--node-config", node_config_arg(node_config), *_health(health_address)]


def site_args(*, superlink: str, node_config: Mapping[str, str | int | float], credentials: SiteCredentials | None,
              runtime_port: int | None = None, device: str | None = None) -> list[str]:
    """``fedlora`` arguments of a whole site in one command: its SuperNode (Runtime API on 127.0.0.1) and its runner."""
    if credentials is None:
        security = ["--insecure"]
    else:
        security = ["--root-certificates", credentials.ca_cert, "--auth-supernode-private-key", credentials.private_key,
                    *_secret(credentials.secret)]
    return ["site", "--superlink", superlink, *security, "--node-config", node_config_arg(node_config),
            *(["--runtime-port", str(runtime_port)] if runtime_port else []), *(["--device", device] if device else [])]


def register_args(public_key: str, connection: str) -> list[str]:
    """``flwr`` arguments that register a SuperNode's public key with the SuperLink of ``connection``."""
    return ["supernode", "register", public_key, connection, "--format", "json"]


def connection_toml(name: str, address: str, ca_cert: str | None) -> str:
    """A ``$FLWR_HOME/config.toml`` whose default connection ``name`` reaches the SuperLink at ``address``.

    ``ca_cert`` must be an absolute path (flwr requires it); ``None`` writes ``insecure = true``.
    """
    security = "insecure = true" if ca_cert is None else f'root-certificates = "{ca_cert}"'
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
