"""The launcher's pre-flight: everything that can be checked before any Flower, SuperLink or Ray process starts.

:func:`preflight` turns the command line's ``key=value`` overrides into the run's config and
refuses it with one line per problem, in seconds:

* every key and value (unknown keys get a did-you-mean; types and ranges as
  :func:`fedlora.config.parse_config` checks them), then the checks that need the registries
  (:func:`fedlora.run_config.load_config`);
* the model: a hub id must be cached or reachable (:func:`fedlora.models.registry.check_model_available`);
* the data: ``dataset.name`` (a local file is read and checked: columns, missing values, labels
  against ``dataset.labels``; a hub id must be cached or reachable), the partitioning of its
  train split among the clients (``natural``: ``partition.column`` must be one of its columns,
  with enough distinct values; ``dirichlet``: labels), and ``dataset.client-files`` (one file per
  client, each checked the same way);
* the trackers of ``report-to`` are installed, and ``resume-from`` names a run directory with a checkpoint;
* the memory a client's model (and the server's) needs fits the device it will use here
  (:func:`memory_check`; each client repeats it on its own device before its base loads).

It also makes relative data paths absolute (Flower's processes run elsewhere) and derives
``round-timeout`` when the user did not set it: on one machine, clients that do not fit on
its cores at once train in waves, and each wave gets the default's time (:func:`round_timeout_note`).

The checks run cheapest first: keys and values need only :mod:`fedlora.config` and the
strategy registry (well under a second); the data checks import ``datasets`` and torch
(a few seconds) only once everything before them passed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, RunConfig, default_flat_config, parse_config
from fedlora.hub import hub_access_problem
from fedlora.models.registry import check_model_available, check_model_task
from fedlora.server.tracking import check_report_to
from fedlora.strategies.registry import option_sections

#: keys that may hold a local path, and when their value is one (the launcher makes it absolute)
PATH_KEYS: dict[str, Callable[[Path], bool]] = {
    "dataset.name": Path.is_file,
    "dataset.client-files": lambda path: True,  # a directory or a glob pattern
    "model.name": Path.is_dir,
}


class PreflightError(Exception):
    """The run cannot start; ``problems`` holds one line for each reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Plan:
    """A checked run: its overrides (as ``flwr run`` gets them), its config, and what to tell the user first."""

    overrides: dict[str, Any]
    cfg: RunConfig
    notes: list[str] = field(default_factory=list)


def parse_value(raw: str, default: Any) -> Any:
    """A command-line value: a TOML value (``4``, ``0.5``, ``true``, ``'text'``), else the text itself;
    text stays text where the key's default is a string (``lora.client-ranks=8`` is ``'8'``)."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    if isinstance(default, str) and not isinstance(value, str):
        return raw
    return value


def parse_overrides(items: list[str], defaults: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` items as typed overrides, and one problem line per item that is not ``key=value``."""
    overrides, problems = {}, []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is invalid: expected key=value, e.g. lora.rank=4")
            continue
        overrides[key.strip()] = parse_value(raw, defaults.get(key.strip()))
    return overrides, problems


def absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Local paths of :data:`PATH_KEYS` made absolute (from the current directory): Flower's processes run elsewhere."""
    fixed = dict(overrides)
    for key, is_path in PATH_KEYS.items():
        value = fixed.get(key)
        if isinstance(value, str) and value and is_path(Path(value).expanduser()):
            fixed[key] = str(Path(value).expanduser().absolute())
    return fixed


def key_problems(overrides: dict[str, Any]) -> list[str]:
    """One line per override whose key is unknown or whose value has the wrong type or range."""
    sections = option_sections()
    problems = []
    for key, value in overrides.items():
        try:
            parse_config({key: value}, sections)
        except ConfigError as err:
            problems.append(str(err))
    return problems


def data_problems(cfg: RunConfig, num_clients: int) -> list[str]:
    """Why the data of ``cfg`` cannot feed ``num_clients`` clients (empty when it can)."""
    from fedlora.data.partition import partition_indices
    from fedlora.data.sources import (
        CLASSIFICATION, client_files, is_hub_dataset, load_site_data, load_task_data, resolve_task,
    )

    dataset = cfg.dataset
    if is_hub_dataset(dataset.name):
        problem = hub_access_problem(dataset.name, "dataset")
        if problem:
            return [f"config key 'dataset.name' = {dataset.name!r} is unavailable: {problem}"]
        labels: tuple[str, ...] = dataset.label_names
    else:
        try:
            data = load_task_data(dataset, cfg.seed)
            if not dataset.client_files and cfg.partition.kind != "iid":  # iid fits any rows; the others may not
                partition_indices(data.train, cfg.partition, num_clients, cfg.seed)
            elif len(data.train) < num_clients:
                return [f"{dataset.name}: {len(data.train)} training rows cannot feed {num_clients} clients"]
        except (ValueError, OSError) as err:
            return [str(err)]
        labels = data.labels
    if not dataset.client_files:
        return []
    files = client_files(dataset)
    if len(files) != num_clients:
        return [f"config key 'dataset.client-files' = {dataset.client_files!r} matches {len(files)} data file(s); "
                f"the run has {num_clients} clients, one file each"]
    task = resolve_task(dataset)
    problems = []
    for file in files:
        try:
            load_site_data(dataset, str(file), task, labels if task == CLASSIFICATION else ())
        except (ValueError, OSError) as err:
            problems.append(str(err))
    return problems


def memory_check(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(problems, notes): whether a client's model (and the server's, when it evaluates) fits the device it will
    use here (:func:`fedlora.task.memory_fit`: the estimate and the knobs that would make it fit); each client
    repeats the check on its own device before its base loads."""
    from fedlora.device import pick_device
    from fedlora.task import memory_fit

    device = pick_device(cfg.device)
    largest = dataclasses.replace(cfg.lora, rank=max(cfg.lora.allowed_ranks))
    checks = [(largest, True)] + ([(cfg.lora, False)] if cfg.evaluation.where == "server" else [])
    notes: list[str] = []
    for lora, training in checks:
        _, line, refused = memory_fit(cfg, device, lora, training)
        if refused:
            return [refused], notes
        notes.append(line)
    return [], notes


def resume_problems(cfg: RunConfig) -> list[str]:
    """``resume-from`` must name a run directory with a checkpoint (relative paths: from the project directory)."""
    if not cfg.resume_from:
        return []
    from fedlora.runtime.launch import PROJECT_DIR
    from fedlora.server.checkpoint import CHECKPOINT_FILE

    checkpoint = (PROJECT_DIR / Path(cfg.resume_from).expanduser()) / CHECKPOINT_FILE
    if checkpoint.is_file():
        return []
    return [f"config key 'resume-from' = {cfg.resume_from!r} is invalid: no checkpoint at {checkpoint} (the run "
            "never completed a round, or this is not a run directory)"]


def available_cores() -> int:
    """CPU cores this process may use (what a local Ray instance gets)."""
    return len(os.sched_getaffinity(0))


def round_timeout_note(cfg: RunConfig, overrides: dict[str, Any], num_supernodes: int, cpus_per_client: int,
                       ray_address: str | None) -> tuple[dict[str, Any], str]:
    """``overrides`` with ``round-timeout`` derived when the user left it at its default, and the line that says so.

    A round waits ``round-timeout`` seconds for all its replies. On one machine Ray runs
    ``cores // cpus-per-client`` clients at a time, so a round's clients train in
    ``ceil(clients / at_once)`` waves: the derived timeout gives every wave the default's time.
    """
    clients = max(1, round(cfg.fraction_train * num_supernodes))
    if ray_address:
        return overrides, (f"clients train on the Ray cluster at {ray_address}; round-timeout = {cfg.round_timeout:g} s "
                           "(raise round-timeout if they train in waves there)")
    at_once = max(1, available_cores() // cpus_per_client)
    waves = math.ceil(clients / at_once)
    shape = (f"{clients} client(s) per round train {min(at_once, clients)} at a time here "
             f"({available_cores()} cores, --cpus-per-client {cpus_per_client})")
    if "round-timeout" in overrides or waves == 1:
        return overrides, f"{shape}; round-timeout = {cfg.round_timeout:g} s"
    derived = cfg.round_timeout * waves
    return ({**overrides, "round-timeout": derived},
            f"{shape}: round-timeout = {derived:g} s ({cfg.round_timeout:g} s per wave of clients; "
            "set round-timeout=SECONDS to change it)")


def _problem(check: Callable[[], object]) -> list[str]:
    """``[message]`` if ``check()`` raises a ConfigError, else ``[]``."""
    try:
        check()
    except ConfigError as err:
        return [str(err)]
    return []


def preflight(items: list[str], num_supernodes: int, cpus_per_client: int, ray_address: str | None = None) -> Plan:
    """Check a launch (see the module docstring); :class:`PreflightError` lists every problem found."""
    defaults = default_flat_config(option_sections())
    overrides, problems = parse_overrides(items, defaults)
    problems += key_problems(overrides)
    if problems:
        raise PreflightError(problems)
    overrides = absolute_paths(overrides)
    flat = {**defaults, **overrides}
    problems = (_problem(lambda: check_model_available(flat["model.name"]))
                + _problem(lambda: check_report_to(flat["report-to"])))
    if problems:
        raise PreflightError(problems)
    from fedlora.data.sources import resolve_task
    from fedlora.run_config import load_config

    try:
        cfg = load_config(flat)
    except ConfigError as err:
        raise PreflightError([str(err)]) from err
    problems = _problem(lambda: check_model_task(cfg.model.name, resolve_task(cfg.dataset)))
    problems += resume_problems(cfg) + data_problems(cfg, num_supernodes)
    if problems:
        raise PreflightError(problems)
    problems, memory_notes = memory_check(cfg)
    if problems:
        raise PreflightError(problems)
    overrides, note = round_timeout_note(cfg, overrides, num_supernodes, cpus_per_client, ray_address)
    return Plan(overrides, load_config({**defaults, **overrides}), [*memory_notes, note])
