"""Hydra callbacks of a multirun: the live sweep status on the console while it runs; when it ends, the
sweep's table, and a non-zero exit status naming each cell and why when any cell failed (a cell records
its failure and returns, so without this a sweep with failed cells would exit 0).

Hydra catches `Exception`s raised by callbacks and only warns; `SystemExit` passes through it, so the
exit status is set by raising that."""
from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bench.core import records
from reports.collect import collect
from reports.status import watch

log = logging.getLogger(__name__)


class CollectTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = collect(sweep_dir)
        except FileNotFoundError as exc:  # every cell failed before writing anything
            log.error("no table: %s", exc)
        else:
            print(f"\n{table.markdown}\n\n(table.md and table.csv written to {sweep_dir})")
        failures = failed_cells(sweep_dir)
        if failures:
            print(f"prunebench: {len(failures)} cell(s) of the sweep failed:", file=sys.stderr)
            for line in failures:
                print(f"  {line}", file=sys.stderr)
            raise SystemExit(1)


def failed_cells(sweep_dir: Path) -> list[str]:
    """'<cell dir or overrides>: <error type>: <message>' for every cell of the sweep's manifest without an
    ok result."""
    found = records.read_results(sweep_dir)
    ok = {r.config_hash for r in found.records if r.ok}
    latest = {r.config_hash: r for r in found.records if not r.ok}
    failures = [f"{path}: unreadable result: {why}" for path, why in found.corrupt]
    for cell in records.read_manifest(sweep_dir) or [{"overrides": [], "config_hash": h} for h in latest]:
        if cell["config_hash"] in ok:
            continue
        result = latest.get(cell["config_hash"])
        where = Path(result.path).parent.name if result is not None else " ".join(cell["overrides"])
        why = "no result (the cell never ran or died before writing it)" if result is None else \
            f"{result.status}: {result.error.type}: {result.error.message}" if result.error else result.status
        failures.append(f"{where}: {why}")
    return failures


IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class SweepProgress(Callback):
    """Under the Submitit launchers (local, Slurm) the cells' own output goes to `.submitit/*` logs, so
    the submitting process watches the sweep dir and prints its status (`reports.status.watch`). The
    basic launcher runs the cells in this process, whose console already shows them."""

    def __init__(self, interval: float = 5.0, heartbeat: float = 60.0):
        self.interval, self.heartbeat = interval, heartbeat
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def __getstate__(self) -> dict:  # Submitit pickles the launcher with Hydra's callbacks: no thread state
        return {"interval": self.interval, "heartbeat": self.heartbeat}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # any launcher but the basic one runs the cells elsewhere (our local/Slurm launchers' targets do not
        # say "submitit": matching that word silenced the status when they replaced Submitit's own)
        if str(config.hydra.launcher.get("_target_", "")) == IN_PROCESS_LAUNCHER:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        self.thread = threading.Thread(target=watch, name="sweep-progress", daemon=True,
                                       args=(sweep_dir, self.stop, self.interval, self.heartbeat,
                                             lambda text: print(text, flush=True)))
        self.thread.start()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
