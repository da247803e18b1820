"""The ``fedlora`` command: ``fedlora <command> --help`` for each.

Running:

* ``fedlora run``               — check a run's config, data and model in seconds, then run it as a local
                                  Flower simulation with readable progress (:mod:`fedlora.runtime.launch`);
* ``fedlora grid``              — run a comparison grid resumably and write its report
                                  (:mod:`fedlora.experiments.run`);
* ``fedlora report``            — any results directory as paired comparisons with 95 % confidence
                                  intervals, plots and the check of a results document
                                  (:mod:`fedlora.experiments.report`);

Deployment:

* ``fedlora site``              — a site in one command: its ``flower-supernode`` and its persistent
                                  ClientApp runner, stopped together (Ctrl-C / SIGTERM);
* ``fedlora clientapp-runner``  — the persistent ClientApp runner alone, attached to a running
                                  SuperNode's Runtime API (what a site's container runs);
* ``fedlora serverapp-runner``  — the persistent ServerApp runner, attached to the SuperLink's
                                  Runtime API;
* ``fedlora register-sites``    — register sites' public keys with the SuperLink (idempotent);
* ``fedlora certs``             — the deployment's CA, SuperLink certificate, node keys and SuperExec
                                  secrets (the script ships in the package: ``make_certs.sh``).

The runners serve only the installed fedlora (:mod:`fedlora.runtime.app_identity`). A command
whose arguments another module parses is listed in :data:`DELEGATED` ("module:function", called
with the arguments after the command name).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlora.deployment.commands import LOOPBACK, supernode_args

DEFAULT_NODE_RUNTIME_PORT = 9094
#: the certificate script, shipped inside the package (deploy/make_certs.sh links to it)
MAKE_CERTS = Path(__file__).resolve().parent / "deployment" / "make_certs.sh"
#: commands that hand their arguments to another function's ``main(argv)``: name -> ("module:function", help)
DELEGATED = {
    "run": ("fedlora.runtime.launch:main", "check a run, then run it as a local Flower simulation (what make run does)"),
    "grid": ("fedlora.experiments.run:main", "run a comparison grid (strategies × partitions × privacy × seeds), "
                                             "resumably, and write its report"),
    "report": ("fedlora.experiments.report:main", "turn a grid's results directory into the paired-CI comparison "
                                                 "tables and plots"),
    "certs": ("fedlora.cli:certs", "create a deployment's CA, SuperLink certificate, node keys and SuperExec secrets"),
}


def _read(path: str | None) -> bytes | None:
    """The file's exact bytes (how Flower reads certificates and the SuperExec secret), or None without a path."""
    return Path(path).expanduser().read_bytes() if path else None


def _link_args(parser: argparse.ArgumentParser, default_address: str | None) -> None:
    parser.add_argument("--runtime-api-address", required=default_address is None, default=default_address,
                        help="the Runtime API to serve tasks from (HOST:PORT)")
    parser.add_argument("--root-certificates", help="CA certificate that signs the Runtime API's TLS certificate")
    parser.add_argument("--superexec-auth-secret-file",
                        help="file holding the secret the SuperLink or SuperNode was started with "
                             "(--superexec-auth-secret-file there); without it, tasks are acquired unsigned")
    parser.add_argument("--poll-interval", type=float, default=None, help="seconds between task polls (default 0.25)")
    parser.add_argument("--health-server-address", help="serve gRPC health checks at HOST:PORT (no TLS; for "
                                                       "container healthchecks)")


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="the site's device for every run it serves (cpu, cuda, cuda:N); "
                                         "default: the run's `device` key")


def _link(args: argparse.Namespace):
    from fedlora.runtime.runner import RuntimeLink

    return RuntimeLink(args.runtime_api_address, _read(args.root_certificates), _read(args.superexec_auth_secret_file))


def _loop_options(args: argparse.Namespace) -> dict:
    return {**({"poll_interval": args.poll_interval} if args.poll_interval else {}),
            "health_address": getattr(args, "health_server_address", None)}


def clientapp_runner(args: argparse.Namespace) -> int:
    from flwr.supercore.constant import TaskType

    from fedlora.runtime.clientapp_runner import COMPONENT, ClientAppRunner
    from fedlora.runtime.runner import run_loop

    runner = ClientAppRunner(_link(args), device=args.device)
    run_loop(runner.link, TaskType.CLIENT_APP, runner.serve, COMPONENT, **_loop_options(args))
    return 0


def serverapp_runner(args: argparse.Namespace) -> int:
    from flwr.supercore.constant import TaskType

    from fedlora.runtime.runner import run_loop
    from fedlora.runtime.serverapp_runner import COMPONENT, ServerAppRunner

    runner = ServerAppRunner(_link(args))
    run_loop(runner.link, TaskType.SERVER_APP, runner.serve, COMPONENT, **_loop_options(args))
    return 0


def site(args: argparse.Namespace) -> int:
    """Start the SuperNode as a child process, serve its ClientApp tasks here; stop both together."""
    from fedlora.deployment.commands import SiteCredentials, parse_node_config

    credentials = None if args.insecure else SiteCredentials(args.root_certificates, args.auth_supernode_private_key,
                                                             args.superexec_auth_secret_file)
    supernode = supernode_args(superlink=args.superlink, host=LOOPBACK, port=args.runtime_port,
                               node_config=parse_node_config(args.node_config), credentials=credentials,
                               max_retries=args.max_retries)
    child = subprocess.Popen(["flower-supernode", *supernode], start_new_session=True)
    args.runtime_api_address = f"{LOOPBACK}:{args.runtime_port}"
    args.root_certificates = None
    try:
        return clientapp_runner(args)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if child.poll() is not None:
                break
            os.killpg(child.pid, sig)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue


def certs(argv: Sequence[str]) -> int:
    """``fedlora certs``: the certificate script with ``argv`` (``--help`` for its options)."""
    return subprocess.call(["bash", str(MAKE_CERTS), *argv])


def register_sites(args: argparse.Namespace) -> int:
    from fedlora.deployment.registration import register_sites as register

    for key, node_id in zip(args.public_keys, register(args.control_api, args.root_certificates, args.public_keys)):
        print(f"{key}: {'registered as node ' + node_id if node_id else 'already registered'}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.",
                                     epilog="`fedlora COMMAND --help` describes each command.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, help=summary, add_help=False)  # listed here, parsed by its own main (see main)

    runner = commands.add_parser("clientapp-runner", help="serve a SuperNode's ClientApp tasks in one persistent process",
                                 description="The persistent ClientApp runner of one site (attach to its SuperNode).")
    _link_args(runner, f"{LOOPBACK}:{DEFAULT_NODE_RUNTIME_PORT}")
    _device_arg(runner)
    runner.set_defaults(handler=clientapp_runner)

    server = commands.add_parser("serverapp-runner", help="serve the SuperLink's ServerApp tasks in one persistent process",
                                 description="The persistent ServerApp runner (attach to the SuperLink's Runtime API).")
    _link_args(server, None)
    server.set_defaults(handler=serverapp_runner)

    one = commands.add_parser("site", help="start a site: its SuperNode and its persistent ClientApp runner",
                              description="A site in one command: flower-supernode (TLS + node key) and the runner.")
    one.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:9092")
    one.add_argument("--root-certificates", help="the federation's CA certificate (ca.crt)")
    one.add_argument("--auth-supernode-private-key", help="this site's private key (supernode-<i>)")
    one.add_argument("--insecure", action="store_true", help="no TLS, no node key: development only")
    one.add_argument("--node-config", default="", help="e.g. 'data-path=\"/data/site.jsonl\" state-dir=\"/var/lib/fedlora\"'")
    one.add_argument("--runtime-port", type=int, default=DEFAULT_NODE_RUNTIME_PORT,
                     help="the SuperNode's Runtime API port on 127.0.0.1 (default 9094)")
    one.add_argument("--max-retries", type=int, default=None, help="SuperNode reconnection attempts (default: forever)")
    one.add_argument("--superexec-auth-secret-file", help="secret shared by this SuperNode and its runner")
    one.add_argument("--poll-interval", type=float, default=None, help="seconds between task polls (default 0.25)")
    _device_arg(one)
    one.set_defaults(handler=site)

    register = commands.add_parser("register-sites", help="register sites' public keys (idempotent)",
                                   description="Register SuperNode public keys with the SuperLink; keys it knows "
                                               "already count as registered, so this can run on every start.")
    register.add_argument("--control-api", default=f"{LOOPBACK}:8000", help="the SuperLink's Control API, HOST:PORT")
    register.add_argument("--root-certificates", help="CA certificate of the SuperLink's TLS certificate")
    register.add_argument("public_keys", nargs="+", help="supernode-<i>.pub files")
    register.set_defaults(handler=register_sites)
    return parser


def delegate(name: str, argv: Sequence[str]) -> int:
    """Run delegated command ``name`` (see :data:`DELEGATED`) with ``argv``."""
    module, function = DELEGATED[name][0].split(":")
    return getattr(importlib.import_module(module), function)(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "site" and not args.insecure and not (args.root_certificates and args.auth_supernode_private_key):
        print("fedlora site: give --root-certificates and --auth-supernode-private-key (or --insecure for development)",
              file=sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
