"""Per-round progress lines, the metrics sink, and the end-of-run table and summary."""

from __future__ import annotations

import time
from typing import Any

from fedlora.config import RunConfig
from fedlora.server.rundir import RunDirectory


def headline_metric(task: str) -> tuple[str, bool]:
    """The eval metric that summarises a run, and whether higher is better."""
    return ("eval_accuracy", True) if task == "classification" else ("eval_perplexity", False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.3e}"
    return "-" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain Markdown table of ``columns`` over ``rows``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


class RoundReporter:
    """Receives every round's metrics: prints one line, appends to metrics.jsonl."""

    def __init__(self, run_dir: RunDirectory, cfg: RunConfig, task: str,
                 previous: list[dict[str, Any]] | None = None) -> None:
        """``previous``: the records already in metrics.jsonl when a run is resumed."""
        self.run_dir = run_dir
        self.cfg = cfg
        self.metric, self.higher_is_better = headline_metric(task)
        self.records: list[dict[str, Any]] = list(previous or [])
        self.started = time.monotonic()

    def on_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        record = {"round": server_round, "strategy": self.cfg.strategy, "train_loss": None, **metrics}
        self.records.append(record)
        self.run_dir.append_metrics(record)
        print(
            f"[fedlora] round {server_round}/{self.cfg.num_server_rounds} "
            f"{self.metric}={_fmt(record.get(self.metric))} eval_loss={_fmt(record.get('eval_loss'))} "
            f"train_loss={_fmt(record.get('train_loss'))} clients={_fmt(record.get('num_clients'))} "
            f"up={int(record.get('bytes_up', 0))}B down={int(record.get('bytes_down', 0))}B"
            + (f" ε={_fmt(record.get('epsilon_max', record.get('epsilon')))}" if self.cfg.dp.mode != "none" else ""),
            flush=True,
        )

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
