"""The one entry point: ``python -m benchmarks <suite> [suite options]`` or ``python -m benchmarks all``.

Each suite is a module of this package with a ``main(argv)``; ``all`` runs every suite with
its defaults, one after the other (never overlapping, so they do not disturb each other's
timings). ``python -m benchmarks <suite> --help`` lists a suite's options.
"""

from __future__ import annotations

import importlib
import os
import sys

#: suite name -> module (each has ``main(argv: list[str] | None) -> None``)
SUITES = {
    "server": "benchmarks.server_round",
    "client": "benchmarks.client_step",
    "memory": "benchmarks.client_memory",
    "overhead": "benchmarks.framework_overhead",
    "scale": "benchmarks.scale",
    "bytes": "benchmarks.bytes_per_round",
    "deployment": "benchmarks.deployment_overhead",
}


def run_suite(name: str, argv: list[str]) -> None:
    """Import the suite's module and run its ``main`` with ``argv``."""
    importlib.import_module(SUITES[name]).main(argv)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in (*SUITES, "all"):
        print(f"usage: python -m benchmarks {{{'|'.join(SUITES)}|all}} [suite options]", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args[0] == "all":
        for name in SUITES:
            print(f"\n## {name}\n", flush=True)
            run_suite(name, [])
    else:
        run_suite(args[0], args[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
