"""A site's persistent ClientApp runner: every message of every run, served by the installed fedlora in one process.

For each task (``flwr/supernode/runtime/run_clientapp.py`` is the protocol): keep the task
alive with heartbeats, pull its message, context, run and app bundle with the task token,
check that the bundle is the installed fedlora (:func:`fedlora.runtime.app_identity.check_app`),
call fedlora's ClientApp in this process, push the reply and the context, and report the
task's status. A foreign app, or a message the ClientApp raises on, gets an error reply that
names the cause — the same line the runner logs — and the runner goes on with the next task.

What the ClientApp caches (base model, tokenizer, dataset, partitions, adapted models) stays
resident across messages; when a run with another model or config arrives, the previous
run's are evicted first (:func:`fedlora.process_cache.clear_process_caches`), so the site
holds one run's models at a time. Node state on disk (DP accountant, FLoRA merges, Fed-SB
factors) is unaffected: a restarted runner continues from it.
"""

from __future__ import annotations

from logging import ERROR, INFO

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedlora.client.app import app as client_app
from fedlora.models.loading import LOADS
from fedlora.protocol import CONFIG, SERVER_ROUND
from fedlora.runtime.app_identity import ForeignApp, check_app, installed_app
from fedlora.runtime.runner import Resident, RuntimeLink, Stopped

COMPONENT = "fedlora-clientapp-runner"


def error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


class ClientAppRunner:
    """Serves ClientApp tasks of one SuperNode (see the module docstring); ``device`` overrides the run's device."""

    def __init__(self, link: RuntimeLink, device: str | None = None) -> None:
        self.link = link
        self.device = device
        self.resident = Resident(COMPONENT)
        self.checked_fabs: set[str] = set()
        installed_app()  # fingerprint the code this process runs now, at start

    def check(self, fab: Fab) -> None:
        """:class:`ForeignApp` unless the bundle is the installed fedlora (each bundle hash checked once)."""
        if fab.hash_str not in self.checked_fabs:
            check_app(fab.content)
            self.checked_fabs.add(fab.hash_str)

    def answer(self, message: Message, context: Context, fab: Fab) -> tuple[Message, str, str]:
        """(reply, sub-status, details) for one message: fedlora's ClientApp's reply, or an error reply saying why not."""
        try:
            self.check(fab)
            self.resident.serve(dict(context.run_config))
            if self.device:
                context.node_config["device"] = self.device
            return client_app(message=message, context=context), SubStatus.COMPLETED, ""
        except ForeignApp as err:
            log(ERROR, "[%s] %s", COMPONENT, err)
            return error_reply(message, ErrorCode.INVALID_FAB, str(err)), SubStatus.FAILED, str(err)
        except Exception as ex:  # noqa: BLE001 — as Flower's runtime: any ClientApp exception becomes an error reply
            reason = f"{type(ex)}:<'{ex}'>"
            log(ERROR, "[%s] ClientApp raised an exception", COMPONENT, exc_info=ex)
            return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), SubStatus.FAILED, reason

    def serve(self, token: str, task: Task) -> None:
        """One task: heartbeat, pull, answer, push the reply and the context."""
        client = self.link.client(COMPONENT, token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "the runner could not pull the task"
        loads = LOADS["base_models"]
        try:
            message, context, run, fab = pull_task_input(client)
            config = message.content[CONFIG] if CONFIG in message.content.config_records else {}
            log(INFO, "[%s] task %d of run %d: %s message for round %s", COMPONENT, task.task_id, run.run_id,
                message.metadata.message_type, config.get(SERVER_ROUND, "?"))
            try:
                reply, status, details = self.answer(message, context, fab)
            except Stopped as stopped:
                reply, status, details = error_reply(message, ErrorCode.UNKNOWN, str(stopped)), SubStatus.FAILED, str(stopped)
                push_message(client, reply, context)
                raise
            push_message(client, reply, context)
            log(INFO, "[%s] task %d done (%s); base models loaded for it: %d", COMPONENT, task.task_id, status,
                LOADS["base_models"] - loads)
        finally:
            push_task_output(client, context, status, details)
            heartbeat.stop()
            client.close()
