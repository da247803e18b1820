"""Writes a marker naming the node it ran on."""

from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    markers = Path(str(context.run_config["marker-dir"]))
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"site-ran-{context.node_id}").write_text(str(dict(context.node_config)))
    return Message(RecordDict(), reply_to=msg)
