"""Writes a marker, asks every node to train, records the replies' errors, and fails if any node refused."""

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    markers = Path(str(context.run_config["marker-dir"]))
    markers.mkdir(parents=True, exist_ok=True)
    (markers / "server-ran").write_text("the foreign ServerApp ran here\n")
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                        message_type=MessageType.TRAIN) for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=120))
    errors = [r.error.reason for r in replies if r.has_error()]
    (markers / "replies.json").write_text(json.dumps({"replies": len(replies), "errors": errors}))
    if errors:
        raise RuntimeError(f"{len(errors)} node(s) refused: {errors[0]}")
