"""Per-round console lines, the metrics sink (metrics.jsonl and the ``report-to`` trackers), the end table and summary.

After every round the console gets one line of numbers, then one line for each client left out
of the round (rejected, refused, late or without a reply: its node, partition and the reason)
and why a round was skipped (bounded updates are recorded in metrics.jsonl only)::

    [fedlora] round 2/5 eval_accuracy=0.6410 eval_loss=1.0312 train_loss=1.1870 clients=3/4 up=…B down=…B
    [fedlora] round 2: left out node 7 (partition 3): no reply within round-timeout = 600 s (raise round-timeout …)
"""

from __future__ import annotations

import time
from typing import Any

from fedlora.config import RunConfig
from fedlora.server.rundir import RunDirectory
from fedlora.server.tracking import Tracker, numeric, open_trackers


def higher_is_better(metric: str) -> bool:
    """Whether higher is better for a headline ``metric`` (an accuracy; not a perplexity)."""
    return metric.endswith("accuracy")


def headline_metric(task: str, where: str = "server") -> tuple[str, bool]:
    """The eval metric that summarises a run, and whether higher is better: the server's held-out one, or the
    clients' (``client_eval_*``) when they evaluate (``evaluation.where = clients``)."""
    metric = "eval_accuracy" if task == "classification" else "eval_perplexity"
    metric = f"client_{metric}" if where == "clients" else metric
    return metric, higher_is_better(metric)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.3e}"
    return "-" if value is None else str(value)


def _clients(record: dict[str, Any]) -> str:
    """``aggregated/sampled`` clients of a training round (``-`` for round 0)."""
    if "num_clients" not in record:
        return "-"
    sampled = record.get("num_sampled")
    return f"{int(record['num_clients'])}" + (f"/{int(sampled)}" if sampled is not None else "")


def round_line(record: dict[str, Any], rounds: int, metric: str, private: bool) -> str:
    """The one console line of numbers of a round."""
    return (f"[fedlora] round {record['round']}/{rounds} {metric}={_fmt(record.get(metric))} "
            f"eval_loss={_fmt(record.get('eval_loss'))} train_loss={_fmt(record.get('train_loss'))} "
            f"clients={_clients(record)} up={int(record.get('bytes_up', 0))}B down={int(record.get('bytes_down', 0))}B"
            + (f" ε={_fmt(record.get('epsilon_max', record.get('epsilon')))}" if private else ""))


def incident_lines(record: dict[str, Any]) -> list[str]:
    """One console line per client left out of the round, and one for a skipped round."""
    prefix = f"[fedlora] round {record['round']}"
    lines = [f"{prefix}: left out {reason}" for reason in record.get("rejected", [])]
    if "skipped" in record:
        lines.append(f"{prefix} skipped ({record['skipped']}): the global adapter is unchanged")
    return lines


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain Markdown table of ``columns`` over ``rows``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


class RoundReporter:
    """Receives every round's metrics: prints its lines, appends to metrics.jsonl, logs to the ``report-to``
    trackers (closed after the last round)."""

    def __init__(self, run_dir: RunDirectory, cfg: RunConfig, task: str,
                 previous: list[dict[str, Any]] | None = None) -> None:
        """``previous``: the records already in metrics.jsonl when a run is resumed."""
        self.run_dir = run_dir
        self.cfg = cfg
        self.metric, self.higher_is_better = headline_metric(task, cfg.evaluation.where)
        self.records: list[dict[str, Any]] = list(previous or [])
        self.started = time.monotonic()
        self.trackers: list[Tracker] = open_trackers(run_dir.path, cfg)

    def on_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        record = {"round": server_round, "strategy": self.cfg.strategy, "train_loss": None, **metrics}
        self.records.append(record)
        self.run_dir.append_metrics(record)
        for line in [round_line(record, self.cfg.num_server_rounds, self.metric, self.cfg.dp.mode != "none"),
                     *incident_lines(record)]:
            print(line, flush=True)
        for tracker in self.trackers:
            tracker.log(server_round, numeric(record))
        if server_round == self.cfg.num_server_rounds:
            for tracker in self.trackers:
                tracker.close()
            self.trackers = []

    def summary(self) -> dict[str, Any]:
        values = [(r["round"], r.get(self.metric)) for r in self.records if r.get(self.metric) is not None]
        best = (max if self.higher_is_better else min)(values, key=lambda v: v[1]) if values else (None, None)
        final = self.records[-1] if self.records else {}
        return {
            "strategy": self.cfg.strategy,
            "rounds": self.cfg.num_server_rounds,
            "metric": self.metric,
            "initial": self.records[0].get(self.metric) if self.records else None,
            "final": final.get(self.metric),
            "best": best[1],
            "best_round": best[0],
            "final_eval_loss": final.get("eval_loss"),
            "total_bytes_up": sum(r.get("bytes_up", 0.0) for r in self.records),
            "total_bytes_down": sum(r.get("bytes_down", 0.0) for r in self.records),
            "final_epsilon": final.get("epsilon_max", final.get("epsilon")),
            "wall_seconds": time.monotonic() - self.started,
            "run_dir": str(self.run_dir.path),
        }

    def table(self) -> str:
        columns = ["round", "train_loss", "eval_loss", self.metric, "agg_error", "bytes_up", "bytes_down"]
        return format_table(self.records, columns)
