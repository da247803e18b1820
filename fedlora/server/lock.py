"""One ServerApp per run directory: an exclusive lock that the ServerApp holds while it writes there.

``<run-dir>/.server.lock`` is locked with ``flock`` for the ServerApp's whole life and names its
owner (run id, pid, host, start time). A second ServerApp for the same directory — a resume
started while the old one still lives, say after a SuperLink crash — is refused with a message
naming that owner. The kernel drops the lock when its process exits or dies, so a lock file
left by a dead ServerApp is stale and simply taken over (the takeover is logged).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import WARNING
from pathlib import Path

from flwr.common import log

LOCK_FILE = ".server.lock"


class RunDirectoryLocked(RuntimeError):
    """Another live ServerApp holds the run directory."""


def _owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


@contextmanager
def run_directory_lock(run_dir: Path, run_id: int) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; :class:`RunDirectoryLocked` names the owner if it is taken."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = _owner(fd)
            raise RunDirectoryLocked(
                f"run directory {run_dir} is in use by the ServerApp of run {owner.get('run-id', '?')} "
                f"(pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}); "
                "stop that ServerApp (or let it finish) before resuming here, or choose another output-dir") from err
        stale = _owner(fd)
        if stale:
            log(WARNING, "run directory %s: taking over the lock left by run %s (pid %s on %s), which is gone",
                run_dir, stale.get("run-id"), stale.get("pid"), stale.get("host"))
        record = {"run-id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
