"""Run the fedlora ServerApp and ClientApp in one Python process: a Grid without a SuperLink.

:class:`InProcessGrid` implements Flower's ``Grid`` for ``num_nodes`` virtual nodes, each
with its own ``Context`` (node config ``partition-id`` / ``num-partitions`` and a node
state that persists across rounds, as a simulated SuperNode's does). Messages are real
Flower Messages with real ArrayRecords; they are handed to the ClientApp directly instead
of travelling through a SuperLink and Ray. It is what fast tests, reproducibility checks
and large studies use; ``flwr run`` (see :mod:`fedlora.runtime.launch`) remains the real runtime.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedlora.run_config import full_defaults

SERVER_NODE = 0


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (node ids 1…N, partition ids 0…N−1)."""

    def __init__(self, client_app: ClientApp, run_config: dict[str, Any], num_nodes: int, run_id: int = 1) -> None:
        self._app = client_app
        self._run = Run.create_empty(run_id)
        self._contexts = {
            node: Context(run_id=run_id, node_id=node, state=RecordDict(), run_config=dict(run_config),
                          node_config={"partition-id": node - 1, "num-partitions": num_nodes})
            for node in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the reply (or the error) for pulling.

        A ClientApp that raises gets an error reply, worded as Flower's runtime words it.
        """
        ids = []
        for message in messages:
            message_id = str(next(self._ids))
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do on push
            node = message.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                reply = self._app(message, self._contexts[node])
            except Exception as ex:  # noqa: BLE001 — Flower's runtime reports every ClientApp exception as an error reply
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            finally:
                TaskIdentity.node_id = SERVER_NODE
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(overrides: dict[str, Any] | None = None, num_nodes: int = 2, client_app: ClientApp | None = None) -> None:
    """Run the fedlora ServerApp's main against an :class:`InProcessGrid` of ``num_nodes`` clients.

    ``client_app`` replaces fedlora's ClientApp (any callable ``(message, context) -> reply``:
    studies of misbehaving clients). Every call is a new run with a random 62-bit run id (as
    Flower's are), so per-run client caches and per-run node state files never collide.
    """
    run_id = secrets.randbits(62)
    from fedlora.client.app import app as fedlora_client_app
    from fedlora.server.app import main

    client_app = client_app or fedlora_client_app

    run_config = {**full_defaults(), **(overrides or {})}
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE
    TaskIdentity.task_id = run_id
    grid = InProcessGrid(client_app, run_config, num_nodes, run_id)
    main(grid, Context(run_id=run_id, node_id=SERVER_NODE, node_config={}, state=RecordDict(), run_config=run_config))
