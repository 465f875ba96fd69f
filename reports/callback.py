"""Hydra callback: print and write the sweep's table when a multirun ends."""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from reports.collect import collect

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
