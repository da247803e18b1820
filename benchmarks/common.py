"""What every suite shares: the machine line, resident memory, a markdown table, a run's metrics."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def machine_line() -> str:
    """CPU count, accelerator, torch version and the 1/5/15-minute load average, for the results."""
    import torch

    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {accelerator}, "
            f"torch {torch.__version__}, load average {load}")


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers are written as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run directory's metrics.jsonl (round 0 = before training)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def seconds_per_step(run: Callable[[int], None], steps: int, rounds: int, warmup: int,
                     sync: Callable[[], None] = lambda: None) -> float:
    """Median over ``rounds`` timed calls of ``run(steps)`` of the seconds per step, after ``run(warmup)``
    (``sync`` waits for the device, e.g. ``torch.cuda.synchronize``, before each clock reading)."""
    if warmup:
        run(warmup)
        sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(steps)
        sync()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)
