"""A sweep's grid from its overrides alone, and the sweep's first console line.

Hydra builds every callback of `hydra.callbacks` (importing its module) before it calls any of them, and
the sweep's validation (`bench.sweep`) stands on the whole harness: seconds of torch and transformers on a
busy machine. `SweepStart` comes first in that list and imports Hydra alone, so "validating N cells ..."
prints while the harness is still loading, before any cell is composed. `bench.sweep` expands the same
grid (`cell_overrides`), so the count is the number of cells it validates.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from bench.launcher import start_fork_server

log = logging.getLogger(__name__)
LOCAL_LAUNCHER = "hydra_plugins.prunebench_launcher.LocalLauncher"  # conf/hydra/launcher/local.yaml


def grid_arguments(params: Optional[dict], task: list[str]) -> list[str]:
    """The sweep's overrides as Hydra's basic sweeper builds them: `hydra.sweeper.params` first (where an
    experiment preset puts its grid), then the command line's `task` overrides, so a command-line value
    wins."""
    return [f"{key}={value}" for key, value in (params or {}).items()] + list(task)


def cell_overrides(task_overrides: list[str]) -> list[list[str]]:
    """The cross product of a multirun's overrides (`grid_arguments`), in the order Hydra's basic sweeper
    runs it."""
    parsed = OverridesParser.create().parse_overrides(task_overrides)
    return BasicSweeper.split_arguments(parsed, None)[0]


class SweepStart(Callback):
    """Built by Hydra with `hydra.mode`, `hydra.sweeper.params` and `hydra.overrides.task` (conf/config.yaml):
    it says how many cells a sweep has the moment Hydra builds the callbacks (its constructor is the
    earliest code of ours Hydra runs; no hook runs before every callback is built). Under the local launcher
    it also starts the sweep's fork server, whose imports then run beside the validation instead of after it."""

    def __init__(self, mode: Any, params: Optional[dict], task: list[str], launcher: Optional[str] = None) -> None:
        if mode == RunMode.MULTIRUN:
            log.info("validating %d cells ...", len(cell_overrides(grid_arguments(params, task))))
            if launcher == LOCAL_LAUNCHER:
                start_fork_server()
