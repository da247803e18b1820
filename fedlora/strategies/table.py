"""The strategies table of README.md and docs/strategies.md, rendered from the registry.

    python -m fedlora.strategies.table [--check]

rewrites the table between the ``<!-- strategies-table -->`` markers of both files
(``--check``: writes nothing, exits 1 when a file is out of date; the test suite runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fedlora.strategies.registry import strategies

PROJECT_DIR = Path(__file__).resolve().parents[2]
FILES = ("README.md", "docs/strategies.md")
BEGIN, END = "<!-- strategies-table -->", "<!-- /strategies-table -->"


def markdown_table() -> str:
    """One row per registered strategy: idea, exactness, what travels, mixed ranks, user-level DP."""
    lines = ["| strategy | idea | exact | up per module | down per module | mixed ranks | user-level DP |",
             "|---|---|---|---|---|---|---|"]
    for name, spec in strategies().items():
        caps, docs = spec.capabilities, spec.docs
        lines.append(f"| `{name}` | {docs.idea} | {'yes' if caps.exact else docs.inexact or 'no'} | {docs.up} | "
                     f"{docs.down} | {'**yes**' if caps.heterogeneous_ranks else 'no'} | {'yes' if caps.linear else 'no'} |")
    return "\n".join(lines)


def rendered(text: str) -> str:
    """``text`` with the table between the markers replaced by :func:`markdown_table`."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} … {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{markdown_table()}\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the strategies table from the registry.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in FILES:
        path = PROJECT_DIR / name
        text = path.read_text(encoding="utf-8")
        new = rendered(text)
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if stale and args.check:
        print(f"out of date (run python -m fedlora.strategies.table): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
