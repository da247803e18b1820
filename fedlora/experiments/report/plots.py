"""PNG plots of a results directory (matplotlib, Agg), one file per study and kind.

* ``<study>-val_metric_vs_round.png``, ``<study>-val_loss_vs_round.png``, ``<study>-agg_error_vs_round.png``
  and, with DP, ``<study>-epsilon_vs_round.png`` (cumulative ε, the largest over clients): one panel
  per setting, the mean over seeds with a band from the lowest to the highest seed; accuracy
  panels draw the majority-class rate of the test split as a dashed line;
* ``<study>-test_vs_epsilon.png``: the test score [95% CI] against ε (no DP at the right, "∞"),
  one panel per partition with more than one privacy level;
* ``<study>-test_vs_alpha.png``: the test score [95% CI] against the Dirichlet α (log axis; iid
  at the right), one panel per privacy level with more than one such partition;
* ``<study>-test_vs_bytes.png``: the test score [95% CI] against bytes per training round (up +
  down, all clients; log axis), one panel per setting, with the majority line.

The study prefix is left out for a grid without named studies. Scores and intervals are the
comparisons' (:func:`fedlora.experiments.report.compare.compare`), so the plots show the tables' numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedlora.experiments.grid import alpha_of, epsilon_of  # noqa: E402
from fedlora.experiments.report.collect import CellResult  # noqa: E402
from fedlora.experiments.report.compare import MAJORITY, Comparison, settings  # noqa: E402
from fedlora.experiments.report.tables import scale_of  # noqa: E402

ROUND_KEYS = {"val_metric": None, "val_loss": "eval_loss", "agg_error": "agg_error", "epsilon": "epsilon_max"}
Comparisons = dict[tuple[str, str, str], Comparison]


def _grid(count: int) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.3 * rows + 0.4), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _colors(methods: list[str]) -> dict[str, tuple[float, ...]]:
    palette = plt.get_cmap("tab20").colors
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _save(fig: plt.Figure, axes: list[plt.Axes], path: Path, title: str) -> None:
    labels: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    columns = max(2, min(len(labels), int(fig.get_figwidth() / 1.6)))
    legend_inches = 0.2 * math.ceil(len(labels) / columns) + 0.25
    fig.set_figheight(fig.get_figheight() + legend_inches)  # the legend gets its own room; the axes keep their size
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=columns, fontsize=7)
    bottom = legend_inches / fig.get_figheight()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def seed_band(cells: list[CellResult], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, and the mean, lowest and highest value over seeds of ``key`` at each round with a value."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for cell in cells:
        for record in cell.rounds:
            if record.get(key) is not None:
                by_round[int(record["round"])].append(float(record[key]))
    rounds = np.array(sorted(by_round))
    values = [by_round[r] for r in rounds]
    return rounds, np.array([np.mean(v) for v in values]), np.array([min(v) for v in values]), \
        np.array([max(v) for v in values])


def majority_rate(cells: list[CellResult]) -> float | None:
    """The majority-class accuracy on the test split of ``cells`` (None without test results)."""
    tested = [c.test for c in cells if c.test is not None]
    return float(np.mean([(t.label == t.majority_label).mean() for t in tested])) if tested else None


def plot_rounds(results: list[CellResult], study: str, kind: str, path: Path) -> bool:
    """Per-round validation metric, validation loss or agg_error of every setting of ``study``; False if none."""
    columns = [s for s in settings(results) if s[0] == study]
    main = [r for r in results if r.role == "main" and r.study == study]
    if not columns:
        return False
    key = ROUND_KEYS[kind] or main[0].summary["metric"]
    columns = [s for s in columns if any(key in record for r in main if r.setting == s for record in r.rounds)]
    if not columns:
        return False
    methods = list(dict.fromkeys(r.method for r in main))
    colors = _colors(methods)
    fig, axes = _grid(len(columns))
    for ax, setting in zip(axes, columns):
        cells = [r for r in main if r.setting == setting]
        for method in methods:
            rounds, mid, low, high = seed_band([c for c in cells if c.method == method], key)
            if len(rounds):
                ax.plot(rounds, mid, marker="o", markersize=2.5, color=colors[method], label=method)
                ax.fill_between(rounds, low, high, color=colors[method], alpha=0.15, linewidth=0)
        rate = majority_rate(cells)
        if kind == "val_metric" and key.endswith("accuracy") and rate is not None:
            ax.axhline(rate, color="black", linestyle="--", linewidth=1, label="majority class")
        if kind == "agg_error":
            ax.set_yscale("log")
        ax.set_title(f"{setting[1]} / {setting[2]}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    _save(fig, axes, path, f"{study or 'results'}: {key} per round (mean over seeds, band = lowest to highest seed)")
    return True


def _errorbar(ax: plt.Axes, x: float, comparison: Comparison, method: str, color: object, label: str | None) -> None:
    row = next((r for r in comparison.rows if r.method == method), None)
    if row is None or row.score is None:
        return
    scale = scale_of(comparison.metric)
    y, low, high = row.score.estimate * scale, row.score.low * scale, row.score.high * scale
    ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o", markersize=4, capsize=2, color=color, label=label)


def _axis_label(comparison: Comparison) -> str:
    return "test accuracy % [95% CI]" if comparison.metric == "accuracy" else "test loss [95% CI]"


def plot_against(comparisons: Comparisons, study: str, against: str, path: Path) -> bool:
    """Test score against ε (``against = "epsilon"``) or α (``"alpha"``); False when the study varies neither."""
    columns = [s for s in comparisons if s[0] == study]
    if against == "epsilon":
        panels = sorted({p for _, p, _ in columns})
        x_of, fixed = (lambda s: epsilon_of(s[2])), (lambda s: s[1])
    else:
        panels = sorted({q for _, _, q in columns})
        x_of, fixed = (lambda s: alpha_of(s[1])), (lambda s: s[2])
    panels = [p for p in panels if len([s for s in columns if fixed(s) == p and not math.isnan(x_of(s))]) > 1]
    if not panels:
        return False
    fig, axes = _grid(len(panels))
    methods = _methods(comparisons, study)
    colors = _colors(methods)
    for ax, panel in zip(axes, panels):
        chosen = sorted((s for s in columns if fixed(s) == panel and not math.isnan(x_of(s))), key=x_of)
        finite = [x_of(s) for s in chosen if math.isfinite(x_of(s))]
        infinity = (max(finite) * 3 if finite else 1.0)
        for setting in chosen:
            comparison = comparisons[setting]
            x = x_of(setting) if math.isfinite(x_of(setting)) else infinity
            for k, method in enumerate(methods):
                _errorbar(ax, x * (1 + 0.03 * (k - len(methods) / 2)), comparison, method, colors[method],
                          method if setting == chosen[0] else None)
        ax.set_xscale("log")
        ticks = finite + ([infinity] if len(finite) < len(chosen) else [])
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + (["∞" if against == "epsilon" else "iid"]
                                                           if len(finite) < len(chosen) else []))
        ax.minorticks_off()
        ax.set_xlabel("ε (sample-level DP)" if against == "epsilon" else "Dirichlet α")
        ax.set_ylabel(_axis_label(comparison))
        ax.set_title(f"{'partition' if against == 'epsilon' else 'privacy'}: {panel}", fontsize=9)
        ax.grid(alpha=0.3)
    _save(fig, axes, path, f"{study or 'results'}: test score against {'ε' if against == 'epsilon' else 'α'}")
    return True


def plot_bytes(comparisons: Comparisons, study: str, path: Path) -> bool:
    """Test score against bytes per training round (up + down, all clients), one panel per setting; the
    baselines, which communicate nothing, as horizontal lines."""
    columns = [s for s in comparisons if s[0] == study]
    if not columns:
        return False
    fig, axes = _grid(len(columns))
    methods = _methods(comparisons, study)
    colors = _colors(methods)
    for ax, setting in zip(axes, columns):
        comparison = comparisons[setting]
        scale = scale_of(comparison.metric)
        for row in comparison.rows:
            if row.score is None:
                continue
            traffic = float(np.mean([c.bytes_per_round("up") + c.bytes_per_round("down") for c in row.cells]))
            if row.method == MAJORITY or traffic == 0:
                ax.axhline(row.score.estimate * scale, color=colors[row.method], linestyle="--", linewidth=1,
                           label=row.method)
            else:
                _errorbar(ax, traffic, comparison, row.method, colors[row.method], row.method)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per training round (up + down, all clients)")
        ax.set_ylabel(_axis_label(comparison))
        ax.set_title(f"{setting[1]} / {setting[2]}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    _save(fig, axes, path, f"{study or 'results'}: test score against communication")
    return True


def _methods(comparisons: Comparisons, study: str) -> list[str]:
    """Every row name of the study's comparisons, in table order."""
    return list(dict.fromkeys(r.method for s, c in comparisons.items() if s[0] == study for r in c.rows))


def write_plots(results: list[CellResult], comparisons: Comparisons, out: Path) -> list[Path]:
    """Every plot of every study (see the module docstring); returns the files written. Test-score plots need
    per-example test results."""
    written = []
    for study in dict.fromkeys(r.study for r in results if r.role == "main"):
        prefix = f"{study}-" if study else ""
        for kind in ROUND_KEYS:
            if plot_rounds(results, study, kind, out / f"{prefix}{kind}_vs_round.png"):
                written.append(out / f"{prefix}{kind}_vs_round.png")
        if not any(r.score is not None for s, c in comparisons.items() if s[0] == study for r in c.rows):
            continue
        for against in ("epsilon", "alpha"):
            if plot_against(comparisons, study, against, out / f"{prefix}test_vs_{against}.png"):
                written.append(out / f"{prefix}test_vs_{against}.png")
        if plot_bytes(comparisons, study, out / f"{prefix}test_vs_bytes.png"):
            written.append(out / f"{prefix}test_vs_bytes.png")
    return written
