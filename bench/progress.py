"""What a running cell is doing, for a console that watches the sweep: `progress.json` beside the cell's
result.json, rewritten (atomically) when a stage starts and as the stage's passes finish their steps
(`step`: "prune block 12/30", "search candidate 7/31", "ppl window 5/16"). `python -m reports status
<dir> --watch` and the sweep's own console (`reports.callback.SweepProgress`) read it.

One cell runs per process (Submitit, or the forked child of `bench.sweep.run_isolated`; the basic
launcher runs them one after another), so the cell being tracked is per process.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from bench.core.perplexity import PPL_STEPS
from bench.core.records import PROGRESS_FILE, write_json_atomic
from methods.lifecycle import PRUNE_STEPS

STEP_UNITS = {**PRUNE_STEPS, **PPL_STEPS}
# Steps of a pass are written at most this often (seconds): a pass of many quick blocks or windows
# would otherwise rewrite the file hundreds of times a second. A new pass and a pass's last step are
# always written.
STEP_INTERVAL = 1.0

# This process's cell: {"dir", "started", "stages" (names entered), "stage", "stage_started",
# "step" (the last written step or None), "written" (monotonic time of the last write)}
_cell: dict = {}


def start(out_dir: Path) -> None:
    _cell.clear()
    _cell.update({"dir": Path(out_dir), "started": time.time(), "stages": []})
    stage("start")


def stage(name: str) -> None:
    """Record that the cell entered stage `name` (load, calib_data, prune, eval_ppl_<set>, save, ...)."""
    if not _cell:
        return
    _cell["stages"].append(name)
    _cell.update({"stage": name, "stage_started": time.time(), "step": None})
    _write()


def step(name: str, index: int, total: int) -> None:
    """Step `index` (from 0) of `total` of pass `name` (`STEP_UNITS`) is done (from the `on_step` of the
    engine and of perplexity)."""
    if not _cell:
        return
    last = _cell["step"]
    done = index + 1
    same_pass = last is not None and last["pass"] == name
    if same_pass and done < total and time.monotonic() - _cell["written"] < STEP_INTERVAL:
        return
    _cell["step"] = {"pass": name, "unit": STEP_UNITS[name], "done": done, "total": total}
    _write()


def _write() -> None:
    payload = {"stage": _cell["stage"], "stage_started": _cell["stage_started"], "cell_started": _cell["started"],
               "pid": os.getpid(), "stages": _cell["stages"]}
    if _cell["step"] is not None:
        payload["step"] = _cell["step"]
    write_json_atomic(_cell["dir"] / PROGRESS_FILE, payload)
    _cell["written"] = time.monotonic()


def finish() -> None:
    """The cell ended: its result.json says how; progress.json goes."""
    if _cell:
        (_cell["dir"] / PROGRESS_FILE).unlink(missing_ok=True)
        _cell.clear()
