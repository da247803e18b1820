"""The launcher end to end: SIGTERM stops every process it started, a SuperLink that does not come up is
reported with its logs kept, and a run on an existing Ray cluster (a head started here on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from fedlora.console import error_line, shown
from fedlora.runtime.launch import free_port, run_simulation
from fedlora.runtime.processes import marked_processes, stop_marked

#: a variable every process started by the launcher (or the Ray head) inherits, so the test can find them all
TAG = "FEDLORA_TEST_LAUNCH_TAG"
TINY = ["model.name=tiny-bert", "local-steps=1", "batch-size=8", "dataset.max-length=16"]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """``proc``'s output up to and including the first line that holds ``needle`` (fails after ``timeout`` s)."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=1.0):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return "".join(seen)
    raise AssertionError(f"no line with {needle!r} within {timeout} s:\n{''.join(seen)[-3000:]}")


def test_sigterm_stops_every_process_of_the_launch(tmp_path):
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.runtime.launch", "--num-supernodes", "2",
                             "--flwr-home", str(tmp_path / "home"), *TINY, "num-server-rounds=50",
                             f"output-dir={tmp_path / 'run'}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        read_until(proc, "[fedlora] round 1:", timeout=400)  # the clients are training: Ray runs
        running = [command_line(pid) for pid in marked_processes(TAG, tag)]
        for name in ("flower-superlink", "flwr-simulation", "raylet", "gcs_server", "ClientAppActor"):
            assert any(name in line for line in running), f"{name} not running: {running}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in proc.stdout.read()
        assert marked_processes(TAG, tag) == [], [command_line(p) for p in marked_processes(TAG, tag)]
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_marked(TAG, tag)


#: a process that, like Ray's raylet, starts a successor when it is told to stop (``generations`` times), and one that
#: ignores SIGTERM altogether
RESPAWNING = """
import os, signal, subprocess, sys, time
left = int(sys.argv[1])
def successor(*_):
    if left:
        subprocess.Popen([sys.executable, "-c", sys.argv[2], str(left - 1), sys.argv[2]])
    os._exit(0)
signal.signal(signal.SIGTERM, successor if left >= 0 else signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_stopping_sweeps_until_no_marked_process_is_left():
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag}
    started = [subprocess.Popen([sys.executable, "-c", RESPAWNING, str(generations), RESPAWNING], env=env,
                                stdout=subprocess.PIPE, text=True) for generations in (5, -1)]
    try:
        for proc in started:
            assert proc.stdout.readline() == "ready\n"
        assert stop_marked(TAG, tag, grace=1.0, timeout=60.0) == []
        assert marked_processes(TAG, tag) == []
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        stop_marked(TAG, tag, grace=0.1, timeout=5.0)


#: a process whose main thread exits while another thread runs on: /proc/<pid>/stat then says zombie and
#: /proc/<pid>/environ fails, yet the process lives (and, were it a raylet, could start more processes)
MAIN_THREAD_EXITS = """
import ctypes, threading, time
threading.Thread(target=lambda: time.sleep(3600)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_exited_is_found_and_stopped():
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS], env={**os.environ, TAG: tag},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 30
        while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "Z", "the main thread did not exit"
        assert marked_processes(TAG, tag) == [proc.pid]
        assert stop_marked(TAG, tag, grace=1.0, timeout=30.0) == []
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


#: a marked process whose child shows no marker in /proc/<pid>/environ (as Ray's agents, whose process title
#: overwrites it): the child belongs to the launch all the same
UNMARKED_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], env={})
print(child.pid, flush=True)
time.sleep(3600)
"""


def test_a_descendant_without_the_marker_is_found_and_stopped():
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-c", UNMARKED_CHILD], env={**os.environ, TAG: tag},
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert TAG.encode() not in Path(f"/proc/{child}/environ").read_bytes()
        assert marked_processes(TAG, tag) == sorted([proc.pid, child])
        assert stop_marked(TAG, tag, grace=1.0, timeout=30.0) == []
        proc.wait(timeout=10)
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split(") ")[1][:1]
    finally:
        for pid in (proc.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_superlink_that_does_not_come_up_is_reported_with_its_logs_kept(tmp_path):
    home = tmp_path / "home"
    result = run_simulation({"model.name": "tiny-bert"}, flwr_home=home, superlink_timeout=0.05, echo=False)
    assert result.status == "not started" and not result.ok
    assert "the local SuperLink did not start" in result.details and "--superlink-timeout" in result.details
    assert str(home / "local-superlink" / "superlink.log") in result.details
    assert (home / "local-superlink").is_dir() and result.log == home / "launch.log" and result.log.is_file()


def test_the_console_keeps_fedlora_lines_and_sums_up_a_failure():
    output = ("\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n"
              "[fedlora] round 1/2 eval_accuracy=0.5\n| round | train_loss |\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "fedlora.config.ConfigError: config key 'lora.rank' = 0 is invalid: expected a number > 0\n"
              "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n")
    assert [line for line in output.splitlines() if shown(line)] == ["[fedlora] round 1/2 eval_accuracy=0.5",
                                                                     "| round | train_loss |"]
    assert error_line(output) == "ConfigError: config key 'lora.rank' = 0 is invalid: expected a number > 0"
    assert error_line("all good\n") is None


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_on_a_ray_head_with_one_data_file_per_client(tmp_path):
    """Flower's multi-node simulation: the clients run on an existing Ray cluster; each trains on its own file."""
    labels = ["sports", "politics", "tech"]
    (tmp_path / "clients").mkdir()
    for client, size in enumerate((24, 15)):
        write_rows(tmp_path / "clients" / f"site-{client}.jsonl",
                   [{"text": f"site {client} text {i}", "label": labels[i % 3]} for i in range(size)])
    write_rows(tmp_path / "eval.jsonl", [{"text": f"held out {i}", "label": labels[i % 3]} for i in range(30)])
    tag, port, ray_dir = uuid.uuid4().hex, free_port(), Path(f"/tmp/ray-{uuid.uuid4().hex[:8]}")  # short: socket paths
    env = {**os.environ, TAG: tag, "HF_HUB_OFFLINE": "1"}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address",
                             "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", str(ray_dir), "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any("raylet" in command_line(p) for p in marked_processes(TAG, tag)):
            assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not start"
            time.sleep(1)
        result = run_simulation({"model.name": "tiny-bert", "num-server-rounds": 1, "local-steps": 1,
                                 "dataset.name": str(tmp_path / "eval.jsonl"), "dataset.task": "classification",
                                 "dataset.labels": ",".join(labels), "dataset.client-files": str(tmp_path / "clients"),
                                 "output-dir": str(tmp_path / "run")},
                                num_supernodes=2, echo=False, timeout=600, ray_address=f"127.0.0.1:{port}")
        assert result.ok, result.output[-3000:]
        drivers = list((ray_dir / "session_latest" / "logs").glob("python-core-driver-*"))
        assert drivers, "no driver connected to the Ray head"
        rows = sorted(int(line.split(" rows")[0].rsplit(" ", 1)[1]) for line in result.output.splitlines()
                      if "replied after" in line)
        assert rows == [15, 24], "each client trained on its own file"
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
        stop_marked(TAG, tag)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert marked_processes(TAG, tag) == []
