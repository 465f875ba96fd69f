"""What a running cell is doing, for a console that watches the sweep: `progress.json` beside the cell's
result.json, rewritten (atomically) when a stage starts. `python -m reports status <dir> --watch` and
the sweep's own console (`reports.callback.SweepProgress`) read it.

One cell runs per process (Submitit, or the forked child of `bench.sweep.run_isolated`; the basic
launcher runs them one after another), so the cell being tracked is per process.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from bench.core.records import PROGRESS_FILE, write_json_atomic

_cell: dict = {}  # {"dir": Path, "started": wall time, "stages": [names done]} of this process's cell


def start(out_dir: Path) -> None:
    _cell.clear()
    _cell.update({"dir": Path(out_dir), "started": time.time(), "stages": []})
    stage("start")


def stage(name: str) -> None:
    """Record that the cell entered stage `name` (load, calib_data, prune, eval_ppl_<set>, save, ...)."""
    if not _cell:
        return
    _cell["stages"].append(name)
    write_json_atomic(_cell["dir"] / PROGRESS_FILE, {"stage": name, "stage_started": time.time(),
                                                      "cell_started": _cell["started"], "pid": os.getpid(),
                                                      "stages": list(_cell["stages"])})


def finish() -> None:
    """The cell ended: its result.json says how; progress.json goes."""
    if _cell:
        (_cell["dir"] / PROGRESS_FILE).unlink(missing_ok=True)
        _cell.clear()
