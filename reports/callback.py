"""Hydra callback: print and write the sweep's table when a multirun ends, and end the command with a
non-zero exit status, naming each cell and why, when any cell of the sweep failed (a cell records its
failure and returns, so without this a sweep with failed cells would exit 0).

Hydra catches `Exception`s raised by callbacks and only warns; `SystemExit` passes through it, so the
exit status is set by raising that."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bench.core import records
from reports.collect import collect

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
