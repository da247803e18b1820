"""The SuperLink host's persistent ServerApp runner: every run's ServerApp, the installed fedlora, in one process.

For each task (``flwr/superlink/runtime/run_serverapp.py`` is the protocol): keep the task
alive with heartbeats, pull its context, run and app bundle, check that the bundle is the
installed fedlora (:func:`fedlora.runtime.app_identity.check_app`) — a foreign app fails
the run with that reason, and nothing of it runs —, fuse the run config from the bundle's
defaults and the run's overrides, run fedlora's ServerApp on an HTTP Grid, and push the
task's status. The process's output is streamed to the run's log (``flwr run --stream``,
``flwr log``) while a run is served.
"""

from __future__ import annotations

from logging import ERROR, INFO
from queue import Empty, Queue

from flwr.app import RecordDict
from flwr.common.config import get_fused_config_from_fab
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.superlink.grid import HttpGrid
from flwr.supercore import log
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.logger import flush_logs, mirror_output_to_queue, start_log_uploader, stop_log_uploader
from flwr.supercore.task_identity import TaskIdentity

from fedlora.runtime.app_identity import ForeignApp, check_app, installed_app
from fedlora.runtime.runner import Resident, RuntimeLink, Stopped, retry_invoker
from fedlora.server.app import app as server_app

COMPONENT = "fedlora-serverapp-runner"


class ServerAppRunner:
    """Serves ServerApp tasks of one SuperLink (see the module docstring)."""

    def __init__(self, link: RuntimeLink) -> None:
        self.link = link
        self.resident = Resident(COMPONENT)
        installed_app()  # fingerprint the code this process runs now, at start
        self.logs: Queue[str | None] = Queue()
        mirror_output_to_queue(self.logs)

    def _drain_logs(self) -> None:
        """Forget output written between runs (it belongs to no run)."""
        try:
            while True:
                self.logs.get_nowait()
        except Empty:
            return

    def serve(self, token: str, task: Task) -> None:
        """One ServerApp task: heartbeat, pull, check the app, run it, push the status."""
        grid = HttpGrid(runtime_api_address=self.link.address, insecure=self.link.insecure,
                        root_certificates=self.link.root_certificates, token=token)
        grid._retry_invoker = retry_invoker()  # noqa: SLF001 — a refusal fails this run, not the whole runner
        runtime = grid._runtime_client  # noqa: SLF001 — as Flower's own ServerApp runtime uses it
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))
        heartbeat.start()
        context, uploader = None, None
        status, details = SubStatus.FAILED, "the runner could not pull the task"
        try:
            res = runtime.PullTaskInput(PullTaskInputRequest())
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
            context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
            grid.set_run(run)
            self._drain_logs()
            uploader = start_log_uploader(log_queue=self.logs, node_id=0, run_id=run.run_id, client=runtime)
            log(INFO, "[%s] task %d: ServerApp of run %d", COMPONENT, task.task_id, run.run_id)
            check_app(fab.content)
            context.run_config = get_fused_config_from_fab(fab.content, run)
            self.resident.serve(dict(context.run_config))
            server_app(grid=grid, context=context)
            status, details = SubStatus.COMPLETED, ""
        except ForeignApp as err:
            log(ERROR, "[%s] %s", COMPONENT, err)
            details = str(err)
        except Stopped as stopped:
            details = str(stopped)
            raise
        except Exception as ex:  # noqa: BLE001 — as Flower's runtime: the run fails with the reason, the runner goes on
            log(ERROR, "[%s] ServerApp raised an exception", COMPONENT, exc_info=ex)
            details = f"ServerApp failed with exception: {ex}"
        finally:
            if uploader is not None:
                flush_logs(self.logs)
            if context is not None:
                context.state = RecordDict()
            try:
                runtime.PushTaskOutput(PushTaskOutputRequest(context=context_to_proto(context) if context else None,
                                                             sub_status=status, details=details))
            finally:
                if uploader is not None:
                    stop_log_uploader(self.logs, uploader)
                heartbeat.stop()
                grid.close()
