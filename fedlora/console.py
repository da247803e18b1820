"""What the launcher's console shows: fedlora's own lines by default, everything with ``--verbose``.

A simulation's output mixes fedlora's lines (the ``[fedlora] …`` progress and round lines, the
end table) with Flower's and Ray's logs and transformers' load reports and deprecation
warnings. By default :func:`shown` keeps only fedlora's lines, :data:`QUIET_ENVIRONMENT` turns
the third-party chatter down at its source, and a failed run is summed up by
:func:`error_line`: the last exception line of the output (the full output stays in the
launch log).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PREFIX = "[fedlora]"
#: environment defaults for the processes of a quiet launch (a variable the user set is kept)
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    "WANDB_SILENT": "true",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: ``SomeError: message`` / ``pkg.module.SomeError: message`` at the start of a line (after log prefixes)
_EXCEPTION = re.compile(r"(?:^|\s)((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)): (\S.*)$")


def quiet_environment(env: dict[str, str], user: Mapping[str, str]) -> dict[str, str]:
    """``env`` with :data:`QUIET_ENVIRONMENT`, except the variables the user set (``user``: their environment)."""
    return {**env, **{name: value for name, value in QUIET_ENVIRONMENT.items() if name not in user}}


def shown(line: str) -> bool:
    """Whether a line of a simulation's output is fedlora's own (a ``[fedlora]`` line or a row of the end table)."""
    return line.startswith(PREFIX) or line.startswith("|")


def error_line(output: str) -> str | None:
    """The last exception line of ``output`` (``ConfigError: config key …``), without its module path; None if none."""
    found = None
    for raw in output.splitlines():
        match = _EXCEPTION.search(_ANSI.sub("", raw).rstrip())
        if match:
            found = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return found
