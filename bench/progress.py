"""What a running cell is doing, for a console that watches the sweep: `progress.json` beside the cell's
result.json, rewritten (atomically) when a stage starts and as the stage's passes finish their steps
(`step`: "prune block 12/30", "search candidate 7/31", "ppl window 5/16"). `python -m reports status
<dir> --watch` and the sweep's own console (`reports.callback.SweepProgress`) read it. The cell's
observer (`bench.observer`) feeds it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from bench.core.perplexity import PPL_STEPS
from bench.core.records import PROGRESS_FILE, write_json_atomic
from bench.speed import SPEED_STEPS
from methods.lifecycle import PRUNE_STEPS

STEP_UNITS = {**PRUNE_STEPS, **PPL_STEPS, **SPEED_STEPS}
# Steps of a pass are written at most this often (seconds): a pass of many quick blocks or windows
# would otherwise rewrite the file hundreds of times a second. A new pass and a pass's last step are
# always written.
STEP_INTERVAL = 1.0


class Progress:
    """The progress.json of one cell, from its start (stage "start") to `finish`."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / PROGRESS_FILE
        self.started = time.time()
        self.stages: list[str] = []  # names entered, in order
        self.step_done: Optional[dict] = None  # the last written step of the current stage
        self.written = 0.0  # monotonic time of the last write
        self.stage("start")

    def stage(self, name: str) -> None:
        """Record that the cell entered stage `name` (load, calib_data, prune, eval_ppl_<set>, save, ...)."""
        self.stages.append(name)
        self.stage_started, self.step_done = time.time(), None
        self._write()

    def step(self, name: str, index: int, total: int) -> None:
        """Step `index` (from 0) of `total` of pass `name` (`STEP_UNITS`) is done."""
        done = index + 1
        same_pass = self.step_done is not None and self.step_done["pass"] == name
        if same_pass and done < total and time.monotonic() - self.written < STEP_INTERVAL:
            return
        self.step_done = {"pass": name, "unit": STEP_UNITS[name], "done": done, "total": total}
        self._write()

    def _write(self) -> None:
        payload = {"stage": self.stages[-1], "stage_started": self.stage_started, "cell_started": self.started,
                   "pid": os.getpid(), "stages": self.stages}
        if self.step_done is not None:
            payload["step"] = self.step_done
        write_json_atomic(self.path, payload)
        self.written = time.monotonic()

    def finish(self) -> None:
        """The cell ended: its result.json says how; progress.json goes."""
        self.path.unlink(missing_ok=True)
