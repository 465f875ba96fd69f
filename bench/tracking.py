"""Log a cell as a W&B run (`logger=wandb`), started with the cell (`start`, so W&B lists it while it
runs), fed while it runs (`Live`, through the cell's observer `bench.observer`: each stage's seconds as
it ends, each step of the pruning passes as it is done (dense statistics and pruning blocks, search
candidates), each perplexity and the zero-shot scores as they are measured; W&B's own system monitor
samples CPU, memory, disk and GPU meanwhile) and filled when it ends
(`log_cell`): its resolved config, its metrics as summary values under their registry names
(`bench.core.metrics.METRICS`), the per-layer sparsity (history, one step per pruned linear, plus a
table) and a table of its metrics. Every logged value is a number. Runs of one sweep share a group (the
sweep dir's name), which the W&B Report of `python -m reports wandb-report` filters on.

W&B is an observer: any exception in here is logged as a warning and swallowed, so a missing account,
a network outage or a wandb bug never fails a cell whose result.json is already written.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

from bench.config import LoggerConfig
from bench.core.metrics import METRICS, metric
from bench.core.records import Result
from methods.lifecycle import PRUNE_STEPS

log = logging.getLogger(__name__)


def summary(result: Result) -> dict:
    """The cell's numbers under the metric names the report panels and targets use."""
    flat = dict(result.metric_values())
    if "measured" in result.sparsity:
        flat["sparsity/measured"] = result.sparsity["measured"]
    flat.update({f"time/{stage}": seconds for stage, seconds in result.timings.items()})
    return flat


def _label(result: Result, name: str) -> str:
    """How tables print `name`: W&B's summary keys stay registry names (its panels and targets read them),
    so the label is where a score on offline mirrors says so."""
    if name.partition("/")[0] not in METRICS:  # sparsity/measured, time/<stage>
        return name
    return metric(name).heading(result.metrics, name.partition("/")[2])


def run_name(result: Result) -> str:
    """Unique per cell and seed within a sweep: the config hash tells apart cells whose keys differ
    elsewhere (method.lam=0.04 vs 0.08)."""
    cell = result.cell
    return f"{cell.model}_{cell.method}_{cell.sparsity}_seed{cell.seed}_{result.config_hash[:8]}"


def start(cfg: LoggerConfig, result: Result, out_dir: Path, sweep_dir: Optional[Path]):
    """Start the cell's W&B run when the cell starts, so W&B shows it running; None when logging is off
    or W&B failed."""
    if cfg.name != "wandb":
        return None
    try:
        import wandb  # seconds to import: only cells that log to W&B pay it

        cell = result.cell
        run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(out_dir),
                         group=cfg.group or Path(sweep_dir or out_dir).name, job_type="cell", name=run_name(result),
                         config=result.config, tags=[cell.model, cell.method, cell.protocol],
                         reinit="finish_previous",
                         # The system monitor samples this process (W&B's default pid is the one that
                         # imported wandb) every 15 s; x_disable_machine_info would stop it. The git and
                         # environment probes (meta) are off: the result records provenance itself.
                         settings=wandb.Settings(console="off", silent=True, x_disable_meta=True,
                                                 x_stats_pid=os.getpid()))
        for name, unit in PRUNE_STEPS.items():  # per-step charts over the step index, not W&B's global step
            run.define_metric(f"{name}/{unit}_seconds", step_metric=f"{name}/{unit}")
        run.define_metric("layer_sparsity", step_metric="layer")
    except Exception as exc:  # noqa: BLE001 - W&B must never fail a cell
        log.warning("W&B logging failed; the cell's result.json is unaffected: %s: %s", type(exc).__name__, exc)
        return None
    return run


class Live:
    """The running cell's W&B run (`start`'s, or None: nothing is logged), fed as the cell goes. A W&B
    failure stops the live logging of this cell, with one warning; `log_cell` still gets the run."""

    def __init__(self, run):
        self.run = run

    def log(self, values: dict) -> None:
        """Log `values` (numbers) now."""
        if self.run is None:
            return
        try:
            self.run.log(values)
        except Exception as exc:  # noqa: BLE001 - W&B must never fail a cell
            log.warning("W&B live logging stopped; the cell's result.json is unaffected: %s: %s",
                        type(exc).__name__, exc)
            self.run = None

    def step(self, name: str, index: int, seconds: float) -> None:
        """Step `index` of the pruning pass `name` (`PRUNE_STEPS`) took `seconds`."""
        unit = PRUNE_STEPS[name]
        self.log({f"{name}/{unit}": index, f"{name}/{unit}_seconds": seconds})


def log_cell(run, result: Result) -> Optional[Path]:
    """Log the finished cell into the run `start` opened and finish it; returns the W&B run dir, or None
    when logging is off or failed."""
    if run is None:
        return None
    try:
        return _log(run, result)
    except Exception as exc:  # noqa: BLE001 - W&B must never fail a cell
        log.warning("W&B logging failed; the cell's result.json is unaffected: %s: %s", type(exc).__name__, exc)
        return None


def _log(run, result: Result) -> Path:
    import wandb

    try:
        per_layer = result.sparsity.get("per_layer", {})
        for index, (name, value) in enumerate(per_layer.items()):
            run.log({"layer": index, "layer_sparsity": value})
        values = summary(result)
        run.summary.update({"status": result.status, "config_hash": result.config_hash,
                            **dataclasses.asdict(result.cell), **values})
        run.log({"per_layer_sparsity": wandb.Table(columns=["index", "linear", "sparsity"],
                                                   data=[[i, n, v] for i, (n, v) in enumerate(per_layer.items())]),
                 "metrics": wandb.Table(columns=["metric", "label", "value"],
                                        data=[[k, _label(result, k), v] for k, v in values.items()])})
        return Path(run.dir).parent
    finally:
        run.finish()
