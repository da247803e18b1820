"""Find and stop every process a launch started, however it was started.

Flower's local SuperLink detaches itself, ``flwr-simulation`` is its child, and Ray daemonises
its GCS server, raylet and workers: none of them stays in the launcher's process group. What
they all keep is their environment. The launcher gives its children one marker variable
(:data:`MARKER`, a random value per launch); every descendant inherits it, so
:func:`marked_processes` finds them by scanning ``/proc/<pid>/environ`` — through the process's other threads
when its main thread has exited while they run on, as Ray's processes do while they stop — with their
descendants (a process that rewrites its title can erase the marker from what ``/proc`` shows), and
:func:`stop_marked` stops them (SIGTERM, then SIGKILL after a grace period, sweeping again until none is left).

:func:`interruptible` turns SIGTERM and SIGINT into :class:`Interrupted`, so the launcher's
``finally`` blocks run and clean up before it exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

#: environment variable every process of one launch inherits
MARKER = "FEDLORA_LAUNCH_ID"


class Interrupted(Exception):
    """The launcher received SIGTERM or SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _threads(pid: int) -> list[Path]:
    """``/proc/<pid>/task/<tid>`` of every thread of ``pid`` (empty once it is gone)."""
    try:
        return sorted(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Whether any thread of ``pid`` runs. A zombie, dead but not yet reaped, does not; a process whose main
    thread has exited while others run (its ``/proc/<pid>/stat`` then says zombie too) does."""
    for thread in _threads(pid):
        try:
            stat = (thread / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            return True
    return False


def _environ(pid: int) -> list[bytes]:
    """The environment of ``pid``: read through the process, or through any of its threads when its main thread
    has exited (``/proc/<pid>/environ`` then fails, though the process runs on); empty when unreadable."""
    for path in (Path(f"/proc/{pid}/environ"), *(thread / "environ" for thread in _threads(pid))):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if data:
            return data.split(b"\0")
    return []


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return parents


def marked_processes(name: str, value: str) -> list[int]:
    """Live processes (other than this one) whose environment holds ``name=value``, and their descendants.

    The descendants count because a process can erase its own marker: Ray's agents set their process title
    with setproctitle, which zeroes most of the memory ``/proc/<pid>/environ`` shows (measured: 19 of 2,085
    entries left, the marker not among them), while their parent, the raylet, keeps it.
    """
    needle = f"{name}={value}".encode()
    parents = _parents()
    marked = {pid for pid in parents if needle in _environ(pid)}
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(marked)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return sorted(pid for pid in found if pid != os.getpid() and _alive(pid))


def stop_marked(name: str, value: str, grace: float = 10.0, timeout: float = 90.0) -> list[int]:
    """Stop every process marked ``name=value``: SIGTERM, up to ``grace`` seconds, then SIGKILL; the processes
    still alive afterwards (empty when every one stopped).

    A process may start another while it stops (Ray's raylet restarts its agents), so the sweep repeats
    until two scans a moment apart find no marked process — once none is alive, none can start one — or
    ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    empty_scans = 0
    while time.monotonic() < deadline:
        pids = marked_processes(name, value)
        if not pids:
            empty_scans += 1
            if empty_scans == 2:
                return []
            time.sleep(0.2)
            continue
        empty_scans = 0
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            signal_deadline = min(time.monotonic() + grace, deadline)
            while (pids := [p for p in pids if _alive(p)]) and time.monotonic() < signal_deadline:
                time.sleep(0.1)
            if not pids:
                break
    return marked_processes(name, value)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` (main thread only); handlers restored after."""
    def interrupt(signum: int, _frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
