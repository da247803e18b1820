"""``report.md`` of a results directory: what finished, how to read it, and every table."""

from __future__ import annotations

from collections import Counter

from fedlora.experiments.report.collect import CellResult
from fedlora.experiments.report.compare import Comparison
from fedlora.experiments.report.tables import comparison_table, overview_table, sweep_table
from fedlora.server.rundir import RUNNING_CODE_VERSION


def freshness(results: list[CellResult]) -> str:
    """One paragraph: how many results are stale, and the code versions behind them."""
    stale = [r for r in results if r.stale]
    if not stale:
        return f"Every result was produced by the running code (version `{RUNNING_CODE_VERSION}`)."
    versions = Counter(str(r.summary.get("code_version", "unrecorded")) for r in stale)
    listed = ", ".join(f"`{v}` ({n})" for v, n in versions.most_common())
    return (f"**{len(stale)} of {len(results)} results are stale (†)**: produced by other code than the running "
            f"version `{RUNNING_CODE_VERSION}` — {listed}. Rerun the grid without `--reuse-stale` to replace them.")


def scoring(results: list[CellResult], reference: str, replicates: int) -> str:
    """How the tables' scores were obtained, for what the results hold."""
    common = ("MB are all clients together; the setup phase (round 0, e.g. Fed-SB's gradient round) is shown apart, "
              "with the ε it spends under DP.")
    if not any(r.test is not None for r in results):
        return ("These runs have no test split (`dataset.test-fraction` = 0): the tables show each method's final "
                "validation metric, mean ± std over seeds, unpaired and without intervals. " + common)
    return ("Test scores are measured once, after the last round, on a test split shared by every run (its fingerprint "
            "is checked). Intervals are 95% two-level bootstrap intervals "
            f"({replicates} replicates) over test examples and seeds, paired: the same examples and seeds for a "
            f"method and the reference `{reference}` (rows without a test split show their validation metric, "
            "unpaired). Accuracy and its differences are in percentage points. " + common)


def report_markdown(name: str, results: list[CellResult], comparisons: dict[tuple[str, str, str], Comparison],
                    reference: str, replicates: int) -> str:
    """The whole report: a header, then per study its overview, its lr sweep and one table per setting."""
    if not results:
        return f"# Results `{name}`\n\nNo run has finished yet.\n"
    lines = [
        f"# Results `{name}`", "",
        f"{sum(r.role != 'sweep' for r in results)} finished runs and {sum(r.role == 'sweep' for r in results)} "
        f"lr-sweep runs. {freshness(results)}", "",
        scoring(results, reference, replicates), "",
    ]
    for study in dict.fromkeys(s[0] for s in comparisons):
        lines += [f"## Study `{study}`" if study else "## Comparisons", ""]
        mine = [c for setting, c in comparisons.items() if setting[0] == study]
        lines += [f"### Overview: Δ vs {reference} [95% CI]", "", overview_table(mine, reference), ""]
        sweep = sweep_table(results, study)
        if sweep:
            lines += ["### Learning rates: final validation metric per lr (chosen in bold)", "", sweep, ""]
        for comparison in mine:
            lines += [f"### {comparison.setting[1]} / {comparison.setting[2]}", "", comparison_table(comparison), ""]
    return "\n".join(lines)
