"""The persistent runner loop: one long-lived process that takes the place of ``flower-superexec``.

Flower 1.39's SuperExec polls a Runtime API (a SuperNode's, for ClientApps; the SuperLink's,
for ServerApps) with ``AcquireTask`` and starts a fresh ``flwr-clientapp`` / ``flwr-serverapp``
process per task, which installs the task's app bundle and imports it. A fedlora runner
speaks the same protocol (``flwr/supercore/superexec/run_superexec.py``) but serves every
task in this one process with the installed fedlora (:mod:`fedlora.runtime.app_identity`
refuses any other app), so what a task loads — torch, the base model, the data — stays
resident for the next one.

The loop acquires one task at a time (signing with ``--superexec-auth-secret-file``'s secret
when one is given) and hands it to the side's ``serve(token, task)``. SIGTERM and SIGINT stop
it: a task in progress ends with an error reply ("runner stopped") and its output pushed,
then the loop returns. A task that fails never stops the loop.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR, INFO
from typing import Any

import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.grpc_health import run_health_server_grpc_no_tls
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient

from fedlora.process_cache import clear_process_caches

#: the Runtime API calls a SuperExec signs with its secret (as Flower's SuperExec does)
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks",
                          "/flwr.proto.Runtime/ClaimTask"})
#: seconds between AcquireTask polls when no task is pending (Flower's SuperExec: 1.0)
DEFAULT_POLL_INTERVAL = 0.25


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: finish the task in progress with an error reply, then stop."""


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(f"runner stopped ({signal.Signals(signum).name})")


def retry_invoker() -> RetryInvoker:
    """Retry a lost connection a few times; raise an HTTP refusal (401: a wrong secret or an expired task token)
    to the caller. Flower's own invoker answers a 401 by sending SIGINT to its process, which would stop a
    runner that serves many tasks because one was refused."""
    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=10), recoverable_exceptions=httpx.TransportError,
                        max_tries=5, max_time=60)


@dataclass(frozen=True)
class RuntimeLink:
    """How a runner reaches one Runtime API: address, TLS (root certificates, or insecure), SuperExec secret."""

    address: str
    root_certificates: bytes | None
    secret: bytes | None

    @property
    def insecure(self) -> bool:
        return self.root_certificates is None

    def client(self, component: str, token: str | None = None) -> RuntimeHttpClient:
        """An HTTP Runtime API client: the runner's own (signed with the secret) or, with ``token``, one task's."""
        interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        elif self.secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods=AUTH_METHODS))
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=self.insecure,
                                                     root_certificates=self.root_certificates, interceptors=interceptors,
                                                     retry_invoker=retry_invoker())


#: run-config keys that change nothing a process keeps resident between runs
NOT_RESIDENT = frozenset({"num-server-rounds", "round-timeout", "output-dir", "resume-from", "fraction-train",
                          "fraction-evaluate", "min-clients"})


class Resident:
    """One run's models and data at a time: a task of a run with another model or config evicts the previous run's."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.key: tuple | None = None

    def serve(self, run_config: dict[str, Any]) -> None:
        """Before a task of ``run_config``: drop every process cache if the resident run was configured otherwise."""
        key = tuple(sorted((k, v) for k, v in run_config.items() if k not in NOT_RESIDENT))
        if self.key is not None and key != self.key:
            clear_process_caches()
            log(INFO, "[%s] a run with another config: evicted the previous run's resident models", self.component)
        self.key = key


#: seconds to wait after the Runtime API refused or failed an AcquireTask, before asking again
REFUSED_RETRY_SECONDS = 5.0


def run_loop(link: RuntimeLink, task_type: TaskType, serve: Callable[[str, Task], None], component: str,
             poll_interval: float = DEFAULT_POLL_INTERVAL, health_address: str | None = None) -> None:
    """Acquire and serve tasks of ``task_type`` until SIGTERM or SIGINT.

    A Runtime API that refuses the runner (a wrong or missing SuperExec secret) or cannot be
    reached is logged — once per distinct error — and asked again every few seconds; the
    runner never serves a task it could not acquire. ``health_address`` starts Flower's gRPC
    health server there while the loop runs.
    """
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    logging.getLogger("flwr").propagate = False  # Opacus's import-time basicConfig would print every line twice
    health = run_health_server_grpc_no_tls(health_address) if health_address else None
    client = link.client(component)
    log(INFO, "[%s] serving %s tasks from the Runtime API at %s", component, task_type.value, link.address)
    last_error = ""
    try:
        while True:
            try:
                acquired = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type.value],
                                                                 agentapp_fab_hashes=[]))
            except Exception as ex:  # noqa: BLE001 — refused (secret) or unreachable: say so, ask again later
                if str(ex) != last_error:
                    log(ERROR, "[%s] the Runtime API at %s refused or failed AcquireTask: %s (is "
                        "--superexec-auth-secret-file the one the SuperLink/SuperNode was started with?)",
                        component, link.address, ex)
                    last_error = str(ex)
                time.sleep(REFUSED_RETRY_SECONDS)
                continue
            last_error = ""
            if acquired.HasField("task") and acquired.token:
                try:
                    serve(acquired.token, acquired.task)
                except Exception as ex:  # noqa: BLE001 — one broken task (a lost link, say) never stops the runner
                    log(ERROR, "[%s] task %d could not be served", component, acquired.task.task_id, exc_info=ex)
            else:
                time.sleep(poll_interval)
    except Stopped as reason:
        log(INFO, "[%s] %s", component, reason)
    finally:
        client.close()
        if health is not None:
            health.stop(grace=1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
