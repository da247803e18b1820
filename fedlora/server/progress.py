"""What the console shows while the server waits for a round's replies.

Each reply is one line as it arrives (for rounds of up to :data:`MAX_REPLY_LINES` clients),
and while replies are outstanding a line every :data:`PROGRESS_SECONDS` says who is still
out and for how long::

    [fedlora] round 2: node 4711 (partition 1) replied after 14.2 s: train_loss=1.734 after 20 local steps in 9.8 s of its own, 155 rows; 3 of 4 out
    [fedlora] round 2: 3 of 4 clients out after 30 s: nodes 12, 13, 14 (round-timeout 600 s)

The "replied after" times are the server's, from the moment the round's messages went out: in a
simulation whose clients share the machine, a client may wait for another before it starts
training; the client's own time in its training loop (``train-seconds``) and the steps it took
come with its reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord

from fedlora.protocol import (
    CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID, PHASE, REFUSED, SERVER_ROUND, SETUP, STATUS, STEPS, TRAIN_LOSS,
    TRAIN_SECONDS,
)
from fedlora.server.round import reply_record

#: seconds between "still out" lines while replies are outstanding
PROGRESS_SECONDS = 15.0
#: rounds with more clients report only the "still out" lines, not every reply
MAX_REPLY_LINES = 16
#: pending nodes named in a "still out" line (the rest are counted)
MAX_NAMED = 8


def exchange_label(message: Message) -> str:
    """``round N``, ``round N evaluation`` or ``round 0 setup``: what a batch of messages is for."""
    config = reply_record(message.content, CONFIG, ConfigRecord) or {}
    label = f"round {int(config.get(SERVER_ROUND, 0))}"
    if config.get(PHASE) == SETUP:
        return label + " setup"
    return label + (" evaluation" if message.metadata.message_type == MessageType.EVALUATE else "")


_RAISED = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


def error_reason(reason: str) -> str:
    """An error reply's reason in one readable line: Flower's ``<class 'pkg.Name'>:<'message'>`` as ``Name: message``."""
    match = _RAISED.match(reason.strip())
    text = f"{match.group(1)}: {match.group(2)}" if match else reason.strip()
    return " ".join(text.split())


def describe_reply(reply: Message, steps: int) -> str:
    """What a reply says, in a few words: an error, a refusal, or its loss (after ``steps`` local steps) and rows."""
    if reply.has_error():
        return "failed: " + (error_reason(reply.error.reason) or "no reason given")
    content = reply.content
    status = reply_record(content, STATUS, ConfigRecord)
    if status is not None and REFUSED in status:
        return f"refused: {status[REFUSED]}"
    metrics = reply_record(content, METRICS, MetricRecord) or {}
    taken = int(metrics.get(STEPS, steps))
    trained = f" in {float(metrics[TRAIN_SECONDS]):.1f} s of its own" if TRAIN_SECONDS in metrics else ""
    facts = [f"train_loss={float(metrics[TRAIN_LOSS]):.4g} after {taken} local steps{trained}"] if TRAIN_LOSS in metrics else []
    facts += [f"{key}={float(value):.4g}" for key, value in metrics.items() if key.startswith("eval_")]
    facts += [f"{int(metrics[NUM_EXAMPLES])} rows"] if NUM_EXAMPLES in metrics else []
    return ", ".join(facts)


class ReplyProgress:
    """Console lines for one batch of messages: ``destinations`` maps message id -> node, sent at ``started``."""

    def __init__(self, label: str, destinations: dict[str, int], started: float, timeout: float, steps: int,
                 out: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.label = label
        self.pending = dict(destinations)
        self.total = len(destinations)
        self.started = started
        self.timeout = timeout
        self.steps = steps
        self.out = out
        self.last_line = started

    def replied(self, reply: Message, now: float) -> None:
        """A reply arrived at ``now``."""
        node = self.pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if self.total > MAX_REPLY_LINES:
            return
        metrics = (reply_record(reply.content, METRICS, MetricRecord) if not reply.has_error() else None) or {}
        who = f"node {node}" + (f" (partition {int(metrics[PARTITION_ID])})" if PARTITION_ID in metrics else "")
        details = describe_reply(reply, self.steps)
        out = f"; {len(self.pending)} of {self.total} out" if self.pending else ""
        self.out(f"[fedlora] {self.label}: {who} replied after {now - self.started:.1f} s"
                 + (f": {details}" if details else "") + out)
        self.last_line = now

    def waiting(self, now: float) -> None:
        """Called while replies are outstanding: a "still out" line at most every :data:`PROGRESS_SECONDS`."""
        if not self.pending or now - self.last_line < PROGRESS_SECONDS:
            return
        nodes = sorted(self.pending.values())
        named = ", ".join(map(str, nodes[:MAX_NAMED])) + (f" and {len(nodes) - MAX_NAMED} more" if len(nodes) > MAX_NAMED else "")
        self.out(f"[fedlora] {self.label}: {len(nodes)} of {self.total} clients out after {now - self.started:.0f} s: "
                 f"node{'s' if len(nodes) > 1 else ''} {named} (round-timeout {self.timeout:g} s)")
        self.last_line = now
