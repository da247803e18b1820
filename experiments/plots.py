"""PNG plots of a sweep (matplotlib, Agg): metric vs round, final metric vs bytes, ε vs round.

Curves are means over the seeds that finished; the non-private baselines (centralized,
local-only) are drawn as dashed grey/black reference curves in every panel of their partition.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from experiments.collect import CellResult  # noqa: E402
from experiments.grid import BASELINES, Grid  # noqa: E402

BASELINE_STYLE = {"centralized": {"color": "black", "linestyle": "--"}, "local-only": {"color": "grey", "linestyle": ":"}}
MARKERS = "osD^vP*X"


def mean_curve(results: list[CellResult], key: str) -> tuple[list[int], list[float]]:
    """Per-round mean of ``key`` over ``results`` (rounds where at least one seed has a value)."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for result in results:
        for record in result.rounds:
            if record.get(key) is not None:
                by_round[int(record["round"])].append(float(record[key]))
    rounds = sorted(by_round)
    return rounds, [mean(by_round[r]) for r in rounds]


def _by(results: list[CellResult], strategy: str, partition: str, privacy: str | None) -> list[CellResult]:
    return [r for r in results if r.cell.strategy == strategy
            and r.cell.partition in (partition, "pooled") and (privacy is None or r.cell.privacy == privacy)]


def _colors(grid: Grid) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {s: palette[i % len(palette)] for i, s in enumerate(grid.strategies)}


def _panels(rows: int, cols: int) -> tuple[plt.Figure, list[list[plt.Axes]]]:
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 7.0), 3.4 * rows + 0.8), squeeze=False, sharex=True)
    for row in axes:
        for ax in row:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, [list(row) for row in axes]


def plot_metric_vs_round(results: list[CellResult], grid: Grid, path: Path) -> None:
    """One panel per partition × privacy: held-out metric per round, one line per strategy."""
    metric = results[0].row["metric"]
    colors = _colors(grid)
    fig, axes = _panels(len(grid.privacy), len(grid.partitions))
    for i, privacy in enumerate(grid.privacy):
        for j, partition in enumerate(grid.partitions):
            ax = axes[i][j]
            for strategy in grid.strategies:
                rounds, values = mean_curve(_by(results, strategy, partition, privacy), metric)
                if rounds:
                    ax.plot(rounds, values, marker="o", markersize=3, color=colors[strategy], label=strategy)
            for baseline in BASELINES:
                rounds, values = mean_curve(_by(results, baseline, partition, "none"), metric)
                if rounds:
                    ax.plot(rounds, values, label=f"{baseline} (no DP)", **BASELINE_STYLE[baseline])
            ax.set_title(f"{partition} / {privacy}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(grid.privacy) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel(metric)
    bottom = _legend(fig, axes)
    fig.suptitle(f"{grid.name}: held-out {metric} per round (mean over seeds)", fontsize=11)
    _save(fig, path, bottom)


def plot_metric_vs_bytes(results: list[CellResult], grid: Grid, path: Path) -> None:
    """One panel per privacy level: final metric vs total bytes up+down (log x), one point per strategy × partition."""
    metric = results[0].row["metric"]
    colors = _colors(grid)
    fig, axes = plt.subplots(1, len(grid.privacy), figsize=(5.0 * len(grid.privacy) + 2.5, 4.4), squeeze=False)
    for ax, privacy in zip(axes[0], grid.privacy):
        for strategy in grid.strategies:
            for k, partition in enumerate(grid.partitions):
                items = [r.row for r in _by(results, strategy, partition, privacy)]
                if items:
                    total = mean(r["bytes_up"] + r["bytes_down"] for r in items)
                    ax.scatter(total, mean(r["final"] for r in items), color=colors[strategy], marker=MARKERS[k % len(MARKERS)],
                               s=45, label=strategy if k == 0 else None)
        for k, partition in enumerate(grid.partitions):
            ax.scatter([], [], color="grey", marker=MARKERS[k % len(MARKERS)], label=partition)
        centralized = [r.row["final"] for r in _by(results, "centralized", "pooled", "none")]
        if centralized:
            ax.axhline(mean(centralized), label="centralized (no DP)", **BASELINE_STYLE["centralized"])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g} MB"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bytes communicated (up + down, whole run)")
        ax.set_ylabel(f"final {metric}")
        ax.set_title(f"privacy: {privacy}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{grid.name}: final {metric} vs communication (mean over seeds)", fontsize=11)
    _save(fig, path)


def plot_epsilon_vs_round(results: list[CellResult], grid: Grid, path: Path) -> bool:
    """One panel per partition × private level: cumulative ε (max over clients) per round; False if no DP cells."""
    private = [p for p in grid.privacy if p != "none"]
    if not private or not any(r.cell.privacy in private for r in results):
        return False
    colors = _colors(grid)
    fig, axes = _panels(len(private), len(grid.partitions))
    for i, privacy in enumerate(private):
        for j, partition in enumerate(grid.partitions):
            ax = axes[i][j]
            for strategy in grid.strategies:
                rounds, values = mean_curve(_by(results, strategy, partition, privacy), "epsilon_max")
                if rounds:
                    ax.plot(rounds, values, marker="o", markersize=3, color=colors[strategy], label=strategy)
            target = float(privacy.removeprefix("eps-"))
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label="target ε")
            ax.set_ylim(0, target * 1.15)
            ax.set_title(f"{partition} / {privacy}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(private) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("ε spent (max over clients)")
    bottom = _legend(fig, axes)
    fig.suptitle(f"{grid.name}: cumulative sample-level ε per round", fontsize=11)
    _save(fig, path, bottom)
    return True


def _legend(fig: plt.Figure, axes: list[list[plt.Axes]]) -> float:
    """One figure legend below the panels; returns the figure fraction it needs at the bottom."""
    labels: dict[str, object] = {}
    for row in axes:
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                labels.setdefault(label, handle)
    columns = max(2, min(len(labels), int(fig.get_figwidth() / 1.5)))
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=columns, fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    lines = -(-len(labels) // columns)
    return (0.22 * lines + 0.2) / fig.get_figheight()


def _save(fig: plt.Figure, path: Path, bottom: float = 0.0) -> None:
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: list[CellResult], grid: Grid, out: Path) -> list[Path]:
    """All plots for the finished cells; returns the files written."""
    if not results:
        return []
    written = [out / "metric_vs_round.png", out / "metric_vs_bytes.png"]
    plot_metric_vs_round(results, grid, written[0])
    plot_metric_vs_bytes(results, grid, written[1])
    if plot_epsilon_vs_round(results, grid, out / "epsilon_vs_round.png"):
        written.append(out / "epsilon_vs_round.png")
    return written
