"""Hydra callbacks of a multirun: the live sweep status on the console while it runs, and the sweep's
table when it ends."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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
            return
        print(f"\n{table.markdown}\n\n(table.md and table.csv written to {sweep_dir})")


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
        if "submitit" not in str(config.hydra.launcher.get("_target_", "")):
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
