"""Numbers come from data: the generated parts of a results document (``experiments/RESULTS.md``), and their check.

The document quotes a results directory through markers that Markdown does not show:

* a value ``<!--= EXPR -->rendered text<!--/-->`` (inline, or spanning lines for a table): the
  renderer replaces the text with EXPR's value, the check fails when they differ;
* a claim ``<!--? EXPR OP 0 -->`` with OP ``>`` (the 95% CI lies above 0), ``<`` (below) or
  ``~`` (it contains 0): the check fails when the data contradict it.

EXPR is one of (SETTING = ``study/partition/privacy``, or ``partition/privacy`` for a grid
without named studies; METHOD as in the tables, e.g. ``fedsb@fedavg-upload``, the baselines as
``majority``, ``centralized``, ``local-only``):

====================================  =====================================================================
``score SETTING METHOD``              test score [95% CI] (accuracy in %, or loss)
``diff SETTING METHOD [vs OTHER]``    paired difference to the setting's reference (or OTHER) [95% CI]
``table SETTING``                     the setting's comparison table
``overview STUDY``                    the study's methods × settings table (``-`` for no study name)
``sweep STUDY``                       the study's lr-sweep table
``seeds SETTING METHOD``              number of seeds
``lr SETTING METHOD``                 the method's learning rate; ``rank SETTING METHOD``: its LoRA rank
``setup-eps SETTING METHOD``          mean ε spent before training (Fed-SB's gradient round)
``mb-round SETTING METHOD``           mean MB per training round, up + down, all clients
``paper TEXT``                        TEXT itself: a number quoted from a paper, not from the data
``progress STUDY``                    the study's finished cells of its grid, lr sweep and main apart
``code STUDY``                        the code versions that produced the study's results, with their counts
``cost STUDY``                        the study's finished cells' wall time: the sum, the median cell, and
                                      cells × median (the sum counts any time the runner was paused)
====================================  =====================================================================

With the grid (its ``grid.toml`` in the results directory), a value of a setting and method the
grid plans but has not finished renders as ``pending (n of m seeds)``, so a document can be
written while a long suite runs; a claim on it fails the check, as does a name the grid lacks.

The check also flags numbers that look measured but sit outside any marker (outside code
spans and comments): a decimal followed by ``%``, ``pts`` or ``points``, a decimal below 1 with
two or more digits (``0.538``), and anything after ``±``.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fedlora.experiments.grid import Grid
from fedlora.experiments.report.collect import CellResult
from fedlora.experiments.report.compare import MAJORITY, Comparison, Row, compare, mean_present, settings
from fedlora.experiments.report.tables import (
    comparison_table, fmt_interval, fmt_number, overview_table, sweep_table,
)

VALUE = re.compile(r"<!--=\s*(.*?)\s*-->(.*?)<!--/-->", re.S)
CLAIM = re.compile(r"<!--\?\s*(.*?)\s*([<>~])\s*0\s*-->", re.S)
COMMENT_OR_CODE = re.compile(r"<!--.*?-->|`[^`\n]*`|```.*?```", re.S)
MEASURED = re.compile(r"\d+\.\d+\s*(?:%|pts\b|points\b)|\b0\.\d{2,}\b|±\s*\d")


#: one-word names of the baseline rows
ALIASES = {"majority": MAJORITY, "centralized": "centralized (no DP)", "local-only": "local-only (no DP)"}


class DocError(ValueError):
    """An expression that cannot be evaluated on the data (unknown setting, method or keyword)."""


class Pending(DocError):
    """An expression on a setting and method the grid plans but whose cells have not finished."""


@dataclass
class Evaluator:
    """Evaluates marker expressions on one results directory's results (comparisons computed once each)."""

    results: list[CellResult]
    reference: str
    replicates: int = 2000
    grid: Grid | None = None

    def __post_init__(self) -> None:
        self._comparisons: dict[tuple[tuple[str, str, str], str], Comparison] = {}

    def comparison(self, setting: tuple[str, str, str], reference: str | None = None) -> Comparison:
        key = (setting, reference or self.reference)
        if key not in self._comparisons:
            try:
                self._comparisons[key] = compare(self.results, setting, key[1], self.replicates)
            except KeyError as err:
                raise DocError(str(err).strip('"')) from err
        return self._comparisons[key]

    def _row(self, setting: tuple[str, str, str], method: str, reference: str | None = None) -> tuple[Comparison, Row]:
        comparison = self.comparison(setting, reference)
        name = ALIASES.get(method, method)
        try:
            return comparison, comparison.row(name)
        except KeyError as err:
            raise DocError(str(err).strip('"')) from err

    def row_of(self, setting: tuple[str, str, str], method: str,
               reference: str | None = None) -> tuple[Comparison, Row]:
        """The comparison and row of ``method`` in ``setting``; :class:`Pending` when the grid plans them but
        they (or the reference) have not finished."""
        try:
            return self._row(setting, method, reference)
        except DocError as err:
            planned = self.planned_seeds(setting, method)
            if planned is None or (reference is not None and self.planned_seeds(setting, reference) is None):
                raise
            done = {r.seed for r in self.results if r.role == "main" and r.setting == setting and r.method == method}
            raise Pending(f"pending ({len(done & planned)} of {len(planned)} seeds)") from err

    def planned_seeds(self, setting: tuple[str, str, str], method: str) -> set[int] | None:
        """The seeds of the grid's main cells of ``method`` in ``setting`` (None: the grid has none, or no grid)."""
        if self.grid is None:
            return None
        if method in ALIASES:
            return self.planned_seeds(setting, self.reference) if method == "majority" else set()
        seeds = {c.seed for c in self.grid.cells()
                 if not c.is_sweep and (c.study, c.partition, c.privacy) == setting and c.method == method}
        return seeds or None

    def progress(self, study: str) -> str:
        """``n of m cells finished (lr sweep a of b, main c of d)`` for the grid's ``study``, plus stale results."""
        if self.grid is None:
            raise DocError("'progress' needs the grid (grid.toml in the results directory)")
        planned = [c for c in self.grid.cells() if c.study == study]
        if not planned:
            raise DocError(f"no study {study!r} in the grid; studies: {[s.name for s in self.grid.studies]}")
        current = [r for r in self.results if r.study == study and not r.stale]
        sweep = sum(1 for c in planned if c.is_sweep)
        done_sweep = sum(1 for r in current if r.role == "sweep")
        stale = sum(1 for r in self.results if r.study == study and r.stale)
        text = (f"{len(current)} of {len(planned)} cells finished (lr sweep {done_sweep} of {sweep}, "
                f"main and baselines {len(current) - done_sweep} of {len(planned) - sweep})")
        return text + (f", {stale} stale" if stale else "")

    def code_versions(self, study: str) -> str:
        """``version (all n results)``, or ``v1 (n1), v2 (n2)`` by count, for the results of ``study``."""
        versions = Counter(str(r.summary.get("code_version", "unrecorded")) for r in self.results if r.study == study)
        if not versions and self.grid is not None and study in {s.name for s in self.grid.studies}:
            return "none yet (no finished results)"
        if not versions:
            raise DocError(f"no results of study {study!r}")
        if len(versions) == 1:
            return f"{next(iter(versions))} (all {sum(versions.values())} results)"
        return ", ".join(f"{version} ({n})" for version, n in versions.most_common())

    def cost(self, study: str) -> str:
        """``n cells: h hours of wall time, median s a cell (cells × median: h')`` over the finished results of
        ``study``. Wall time, not CPU time: with ``--workers`` equal to the cores each cell has one core and the hours
        are core-hours."""
        seconds = sorted(float(r.summary.get("wall_seconds") or 0.0) for r in self.results if r.study == study)
        if not seconds:
            raise DocError(f"no results of study {study!r}")
        median = statistics.median(seconds)
        return (f"{len(seconds)} cells: {sum(seconds) / 3600:.1f} hours of wall time, median {median:.0f} s a cell "
                f"(cells × median: {len(seconds) * median / 3600:.1f} hours)")

    def value(self, expression: str) -> str:
        """The rendered text of a value expression (see the module docstring)."""
        words = expression.split()
        if not words:
            raise DocError("empty expression")
        keyword, args = words[0], words[1:]
        if keyword == "paper":
            return expression.partition(" ")[2]
        if keyword == "progress" and len(args) == 1:
            return self.progress("" if args[0] == "-" else args[0])
        if keyword == "code" and len(args) == 1:
            return self.code_versions("" if args[0] == "-" else args[0])
        if keyword == "cost" and len(args) == 1:
            return self.cost("" if args[0] == "-" else args[0])
        if keyword in ("overview", "sweep") and len(args) == 1:
            study = "" if args[0] == "-" else args[0]
            text = overview_table([self.comparison(s) for s in settings(self.results) if s[0] == study],
                                  self.reference) if keyword == "overview" else sweep_table(self.results, study)
            return f"\n{text}\n"
        if len(args) < (1 if keyword == "table" else 2):
            raise DocError(f"{expression!r}: expected '{keyword} SETTING METHOD'")
        try:
            return self._value(expression, keyword, parse_setting(args[0]), args[1:])
        except Pending as pending:
            return str(pending)

    def _value(self, expression: str, keyword: str, setting: tuple[str, str, str], rest: list[str]) -> str:
        """A value expression on one setting (``rest``: the words after it)."""
        if keyword == "table" and not rest:
            comparison, _ = self.row_of(setting, self.reference)
            return f"\n{comparison_table(comparison)}\n"
        method, rest = rest[0], rest[1:]
        if keyword == "diff":
            other = rest[1] if len(rest) == 2 and rest[0] == "vs" else None
            comparison, row = self.row_of(setting, method, other)
            return fmt_interval(row.diff, comparison.metric, signed=True)
        comparison, row = self.row_of(setting, method)
        if keyword == "score":
            return fmt_interval(row.score, comparison.metric)
        if keyword == "seeds":
            return str(len(row.seeds))
        if keyword in ("lr", "rank"):
            return f"{row.config_value('lr' if keyword == 'lr' else 'lora.rank'):g}"
        if keyword == "setup-eps":
            return fmt_number(mean_present([c.setup_epsilon() for c in row.cells]))
        if keyword == "mb-round":
            return fmt_number(mean_present([(c.bytes_per_round("up") + c.bytes_per_round("down")) / 1e6
                                            for c in row.cells]))
        raise DocError(f"{expression!r}: unknown keyword {keyword!r}")

    def claim_holds(self, expression: str, op: str) -> bool:
        """Whether the claim ``diff … OP 0`` holds: the 95% CI above 0, below 0, or containing 0."""
        words = expression.split()
        if not words or words[0] != "diff" or len(words) not in (3, 5):
            raise DocError(f"{expression!r}: a claim compares 'diff SETTING METHOD [vs OTHER]' with 0")
        other = words[4] if len(words) == 5 else None
        try:
            _, row = self.row_of(parse_setting(words[1]), words[2], other)
        except Pending as pending:
            raise DocError(f"{expression!r}: a claim on cells not yet finished, {pending}") from pending
        if row.diff is None:
            raise DocError(f"{expression!r}: no paired difference ({row.note or 'no test results'})")
        return {">": row.diff.low > 0, "<": row.diff.high < 0, "~": not row.diff.excludes_zero()}[op]


def parse_setting(text: str) -> tuple[str, str, str]:
    """``study/partition/privacy`` (or ``partition/privacy`` for the unnamed study) as a setting."""
    parts = text.split("/")
    if len(parts) == 2:
        return "", parts[0], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise DocError(f"setting {text!r}: expected 'study/partition/privacy' or 'partition/privacy'")


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def render(text: str, evaluator: Evaluator) -> str:
    """``text`` with every value marker's text replaced by its expression's value; a :class:`DocError` names the
    line and the expression that could not be evaluated."""
    def rendered(match: re.Match[str]) -> str:
        try:
            return f"<!--= {match.group(1)} -->{evaluator.value(match.group(1))}<!--/-->"
        except DocError as err:
            raise DocError(f"line {_line(text, match.start())}: {match.group(1)!r}: {err}") from None
    return VALUE.sub(rendered, text)


def check(text: str, evaluator: Evaluator) -> list[str]:
    """Every problem of the document against the data, one line each (empty when it agrees with them)."""
    problems = []
    for match in VALUE.finditer(text):
        expression, written = match.group(1), match.group(2)
        try:
            value = evaluator.value(expression)
        except DocError as err:
            problems.append(f"line {_line(text, match.start())}: {err}")
            continue
        if value.strip() != written.strip():
            shown = value.strip() if "\n" not in value.strip() else "(the table differs; rerun the renderer)"
            problems.append(f"line {_line(text, match.start())}: '{expression}' is {written.strip()!r} in the "
                            f"document but {shown!r} in the data")
    for match in CLAIM.finditer(text):
        expression, op = match.group(1), match.group(2)
        try:
            holds = evaluator.claim_holds(expression, op)
        except DocError as err:
            problems.append(f"line {_line(text, match.start())}: {err}")
            continue
        if not holds:
            meaning = {">": "above 0", "<": "below 0", "~": "contains 0"}[op]
            problems.append(f"line {_line(text, match.start())}: claim '{expression} {op} 0' (the 95% CI {meaning}) "
                            f"is contradicted by the data: {evaluator.value(expression)}")
    prose = COMMENT_OR_CODE.sub(lambda m: " " * len(m.group(0)), VALUE.sub(lambda m: " " * len(m.group(0)), text))
    for match in MEASURED.finditer(prose):
        problems.append(f"line {_line(prose, match.start())}: {match.group(0)!r} looks measured but is not a marker; "
                        "quote it with <!--= … --> (or <!--= paper … --> for a paper's number)")
    return problems


def render_file(path: Path, evaluator: Evaluator) -> None:
    """Rewrite the document ``path`` with every value marker rendered from the data."""
    path.write_text(render(path.read_text(encoding="utf-8"), evaluator), encoding="utf-8")


def check_file(path: Path, evaluator: Evaluator) -> list[str]:
    """The problems of the document ``path`` (see :func:`check`), each prefixed with the file name."""
    return [f"{path}:{problem.removeprefix('line ')}" for problem in check(path.read_text(encoding="utf-8"), evaluator)]
