"""The one listener of a running cell: the recipe (`bench.pipeline`) and the model sources tell it
about stages and steps, and it keeps the three records of them in step: the stage timings in
`Result.timings`, `progress.json` (`bench.progress`) and the W&B run's live charts (`bench.tracking`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from bench.core.records import Result
from bench.progress import Progress
from bench.tracking import Live
from methods.lifecycle import PRUNE_STEPS


class CellObserver:
    def __init__(self, result: Result, progress: Progress, live: Live):
        self.result, self.progress, self.live = result, progress, live

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """`with observer.stage("load"):` the cell is in stage `name`; its wall time goes to
        `result.timings[name]` (also when the stage fails: the record shows where the time went)."""
        self.enter(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timed({name: time.perf_counter() - start})

    def enter(self, name: str) -> None:
        """The cell is in stage `name`, which times its parts itself (the engine's passes: `timed`)."""
        self.progress.stage(name)

    def timed(self, seconds: dict[str, float]) -> None:
        """These stages took these seconds."""
        self.result.timings.update(seconds)
        self.live.log({f"time/{stage}": value for stage, value in seconds.items()})

    def step(self, name: str, index: int, total: int, seconds: float) -> None:
        """The `on_step` of the engine and of perplexity: progress.json hears of every step, the W&B run
        of the pruning passes' (perplexity's windows would only crowd its charts)."""
        self.progress.step(name, index, total)
        if name in PRUNE_STEPS:
            self.live.step(name, index, seconds)

    def measured(self, values: dict[str, float]) -> None:
        """Metrics (under their registry names) as they are measured."""
        self.live.log(values)
