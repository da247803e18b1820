"""The command lines of a fedlora deployment (Flower 1.39, grpc-rere Fleet API) — one source of truth.

``docker-compose.yml`` is rendered from these functions (:mod:`fedlora.deployment.compose`) and
the loopback test starts the very same argument lists as local processes
(:mod:`fedlora.deployment.loopback`), so the two cannot drift apart. Every function is pure:
it turns addresses and file paths into the argument list of one Flower executable
(without the executable's name, which is what a container's ``command:`` holds).

Secure by default: a :class:`Credentials` directory (written by ``deploy/make_certs.sh``)
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


def node_key_name(index: int) -> str:
    """File name of SuperNode ``index``'s private key (1-based, as ``make_certs.sh`` writes it); ``.pub`` is its public key."""
    return f"supernode-{index}"


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

    def node_private_key(self, index: int) -> str:
        return self.path(node_key_name(index))

    def site(self, index: int) -> SiteCredentials:
        """What site ``index`` holds of this directory: the CA certificate and its private key."""
        return SiteCredentials(self.ca_cert, self.node_private_key(index))

    def node_public_key(self, index: int) -> str:
        return self.path(node_key_name(index) + ".pub")


def superlink_args(*, host: str, port: int, fleet_address: str, database: str,
                   credentials: Credentials | None) -> list[str]:
    """``flower-superlink`` arguments: TLS + SuperNode auth (or ``--insecure``), explicit addresses, no runtime installs.

    ``database`` is a file path (SuperLink state survives restarts) or ``:flwr-in-memory:``.
    """
    if credentials is None:
        security = ["--insecure"]
    else:
        security = ["--ssl-ca-certfile", credentials.ca_cert, "--ssl-certfile", credentials.server_cert,
                    "--ssl-keyfile", credentials.server_key, "--enable-supernode-auth"]
    return [*security, "--isolation", ISOLATION, "--disable-runtime-dependency-installation",
            "--database", database, "--host", host, "--port", str(port), "--fleet-api-address", fleet_address]


def superexec_args(*, runtime_address: str, ca_cert: str | None) -> list[str]:
    """``flower-superexec`` arguments (the fallback runner): attach to a Runtime API at ``runtime_address``.

    ``ca_cert`` verifies a TLS Runtime API (the SuperLink's); ``None`` connects without TLS,
    which is only for a Runtime API bound to loopback (a SuperNode's) or development.
    """
    security = ["--insecure"] if ca_cert is None else ["--root-certificates", ca_cert]
    return [*security, "--runtime-api-address", runtime_address]


def serverapp_runner_args(*, runtime_address: str, ca_cert: str | None) -> list[str]:
    """``fedlora`` arguments of the persistent ServerApp runner attached to the SuperLink's Runtime API.

    ``ca_cert`` verifies the Runtime API's TLS certificate; ``None`` connects without TLS (development).
    """
    security = [] if ca_cert is None else ["--root-certificates", ca_cert]
    return ["serverapp-runner", "--runtime-api-address", runtime_address, *security]


def clientapp_runner_args(*, runtime_address: str, device: str | None = None) -> list[str]:
    """``fedlora`` arguments of a site's persistent ClientApp runner attached to its SuperNode's loopback Runtime API."""
    return ["clientapp-runner", "--runtime-api-address", runtime_address, *(["--device", device] if device else [])]


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


@dataclass(frozen=True)
class SiteCredentials:
    """What one site holds: the federation's CA certificate and its own SuperNode private key (paths)."""

    ca_cert: str
    private_key: str


def supernode_args(*, superlink: str, host: str, port: int, node_config: Mapping[str, str | int | float],
                   credentials: SiteCredentials | None, max_retries: int | None = None) -> list[str]:
    """``flower-supernode`` arguments for one site.

    ``superlink`` is the SuperLink's Fleet API address; ``host:port`` this node's Runtime
    API (for its runner). With ``credentials``, TLS is verified against the CA and the node
    signs in with its private key; ``None`` is ``--insecure`` (development only).
    ``max_retries`` bounds reconnection attempts (default: retry forever).
    """
    if credentials is None:
        security = ["--insecure"]
    else:
        security = ["--root-certificates", credentials.ca_cert, "--auth-supernode-private-key", credentials.private_key]
    retries = [] if max_retries is None else ["--max-retries", str(max_retries)]
    return [*security, "--superlink", superlink, "--isolation", ISOLATION, "--host", host, "--port", str(port),
            *retries, "--node-config", node_config_arg(node_config)]


def register_args(public_key: str, connection: str) -> list[str]:
    """``flwr`` arguments that register a SuperNode's public key with the SuperLink of ``connection``."""
    return ["supernode", "register", public_key, connection, "--format", "json"]


def connection_toml(name: str, address: str, ca_cert: str | None) -> str:
    """A ``$FLWR_HOME/config.toml`` whose default connection ``name`` reaches the SuperLink at ``address``.

    ``ca_cert`` must be an absolute path (flwr requires it); ``None`` writes ``insecure = true``.
    """
    security = "insecure = true" if ca_cert is None else f'root-certificates = "{ca_cert}"'
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
