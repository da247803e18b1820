"""Shared test setup: offline, quiet, small."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FEDLORA_STATE_DIR", tempfile.mkdtemp(prefix="fedlora-test-node-state-"))
