"""The deployment command lines of README.md and docs/deployment.md, rendered from :mod:`fedlora.deployment.commands`.

    python -m fedlora.deployment.docs [--check]

rewrites every block between ``<!-- command:NAME -->`` and ``<!-- /command:NAME -->`` with the
command lines :data:`BLOCKS` builds — the same builders the loopback deployment test and the
compose files use, with the documentation's example hosts and paths — so what a reader copies
is what is tested (``--check``: write nothing, exit 1 when a file is out of date).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable

from fedlora.deployment.commands import (
    Credentials,
    clientapp_runner_args,
    serverapp_runner_args,
    site_args,
    superlink_args,
    supernode_args,
)
from fedlora.runtime.launch import PROJECT_DIR

FILES = ("README.md", "docs/deployment.md")
#: the documentation's example: the SuperLink host's name, the credentials directory, a site's node config
SUPERLINK_HOST = "fl.example.org"
CERTS = Credentials("deploy/certs")
SITE = {"data-path": "/data/site1.jsonl", "state-dir": "/var/lib/fedlora"}
WIDTH = 100


def shell(argv: list[str], background: bool = False) -> str:
    """``argv`` as a shell command, wrapped with ``\\`` continuations at about :data:`WIDTH` characters (flags keep
    their values on their line)."""
    units: list[str] = []
    for arg in argv:
        if units and units[-1].startswith("--") and " " not in units[-1] and not arg.startswith("--"):
            units[-1] += " " + shlex.quote(arg)  # a flag stays with its value
        else:
            units.append(shlex.quote(arg))
    lines, line = [], ""
    for word in units:
        if line and len(line) + 1 + len(word) > WIDTH - 2:
            lines.append(line)
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line + (" &" if background else ""))
    return " \\\n".join(lines)


def superlink_host() -> str:
    return "\n".join([
        shell(["flower-superlink", *superlink_args(host="127.0.0.1", port=8000, fleet_address="0.0.0.0:9092",
                                                   database="deploy/state/superlink.db", credentials=CERTS)], True),
        "FEDLORA_PROJECT_DIR=$PWD " + shell(["fedlora", *serverapp_runner_args(
            runtime_address="127.0.0.1:8000", ca_cert=CERTS.ca_cert, secret=CERTS.superlink_secret)], True),
    ])


def one_site() -> str:
    site = CERTS.site(1)
    return shell(["fedlora", *site_args(superlink=f"{SUPERLINK_HOST}:9092", node_config=SITE, credentials=site,
                                        device="cuda:0")])


def site_in_two() -> str:
    site = CERTS.site(1)
    return "\n".join([
        shell(["flower-supernode", *supernode_args(superlink=f"{SUPERLINK_HOST}:9092", host="127.0.0.1", port=9094,
                                                   node_config=SITE, credentials=site)], True),
        shell(["fedlora", *clientapp_runner_args(runtime_address="127.0.0.1:9094", device="cuda:0", secret=site.secret)],
              True),
    ])


BLOCKS: dict[str, Callable[[], str]] = {"superlink-host": superlink_host, "site": one_site, "site-in-two": site_in_two}


def rendered(text: str) -> str:
    """``text`` with every known command block re-rendered."""
    for name, build in BLOCKS.items():
        pattern = re.compile(rf"(<!-- command:{name} -->\n```bash\n)(?:.*?\n)?(```\n<!-- /command:{name} -->)", re.DOTALL)
        text = pattern.sub(lambda m: m.group(1) + build() + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the documented deployment commands from their builders.")
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
        print(f"out of date (run python -m fedlora.deployment.docs): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
