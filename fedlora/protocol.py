"""The wire protocol between the fedlora ServerApp and ClientApp: every name both sides use.

A server message carries array records (the global adapter under :data:`ARRAYS`, and
strategy-specific records such as FLoRA's merges or Fed-SB's fixed factors) and one
:data:`CONFIG` record; a reply carries :data:`ARRAYS`, a :data:`METRICS` record and, when
a client refuses to train, a :data:`STATUS` record. Both sides import the names from
here and nowhere else, so the client never imports server code.
"""

from __future__ import annotations

# ----- record names ---------------------------------------------------------------------
#: the global adapter state (down) / the client's upload (up)
ARRAYS = "arrays"
#: the round's instructions (down)
CONFIG = "config"
#: numbers a reply reports (up)
METRICS = "metrics"
#: why a client refused a round (up; key :data:`REFUSED`)
STATUS = "status"
#: a base-weight update the node must merge before training (down): ``merge-<round>``
MERGE_PREFIX = "merge-"
#: Fed-SB's fixed B and A factors, sent to each node once (down)
LORASB_FACTORS = "lorasb-factors"


def merge_record(server_round: int) -> str:
    """Record name of the base-weight merge of ``server_round``."""
    return f"{MERGE_PREFIX}{server_round}"


# ----- config keys (down) ---------------------------------------------------------------
SERVER_ROUND = "server-round"
#: names the logical run for the nodes' on-disk state; kept across a server resume
RUN_KEY = "run-key"
#: :data:`SETUP` for a phase before round 1 (Fed-SB's gradient round), else absent
PHASE = "phase"
SETUP = "setup"
#: fingerprint of FFA-LoRA's frozen A, so a client with another A refuses
FFA_A_DIGEST = "ffa-a-digest"
#: comma-separated target modules of Fed-SB's gradient round
FEDSB_TARGETS = "fedsb-targets"

# ----- reply metrics (up) -----------------------------------------------------------------
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
#: the LoRA rank the client trained at
RANK = "rank"
TRAIN_LOSS = "train_loss"
#: cumulative sample-level ε of the node, and the noise multiplier it used
EPSILON = "epsilon"
NOISE_MULTIPLIER = "noise-multiplier"
#: the client's own time in its local training loop (seconds) and the optimizer steps it took there
TRAIN_SECONDS = "train-seconds"
STEPS = "steps"
#: seconds by which a simulated straggler's reply arrives later than it did
SIMULATED_DELAY = "simulated-delay"

# ----- status keys (up) -------------------------------------------------------------------
REFUSED = "refused"
