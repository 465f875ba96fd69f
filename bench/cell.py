"""One cell of a sweep: load -> calibrate -> prune -> (recover) -> (save) -> evaluate -> result record.

A failing cell records its exception and traceback in its result and returns normally, so one bad
cell never takes the rest of a sweep down. An interrupted one (Ctrl-C, or Submitit requeuing it on
preemption/timeout) records "interrupted" and re-raises; a killed one stays "running" with the host and
pid that ran it, so `python -m reports status` can tell it is dead. Neither counts as done on resume;
run again into the same dir, either goes on from its last saved pruned block (bench/resume.py), and its
result says so (`process.resumed_from_block`).

This module keeps the cell's record (skipping a done cell, its own dir, failures); the recipe itself is
`bench.pipeline`.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Optional

from bench import checkpoint, models, pipeline, progress, provenance, resume, tracking
from bench.config import RunConfig
from bench.core import identity, records
from bench.core.records import CellKey, Failure, Result
from bench.core.vocab import ConfigError
from bench.observer import CellObserver

log = logging.getLogger(__name__)


def find_completed(root: Optional[Path], config_hash: str) -> Optional[Result]:
    """A finished result with this config hash anywhere under `root` (the sweep dir), if any."""
    if root is None or not root.exists():
        return None
    for result in records.read_results(root).records:
        if result.config_hash == config_hash and result.ok:
            return result
    return None


def run_cell(cfg: RunConfig, resolved: dict, out_dir: Path, sweep_dir: Optional[Path] = None,
             rerun: str = "failed", cache: bool = False) -> Result:
    """`rerun="failed"` returns an existing ok result with the same config hash instead of running;
    `rerun="all"` always runs. `cache`: reuse what other cells computed (bench/cache.py)."""
    out_dir = Path(out_dir)
    resolved = cfg.recorded(resolved)
    config_hash = identity.config_hash(resolved)
    save_to = _save_target(cfg, out_dir, sweep_dir)
    previous = None if rerun == "all" else find_completed(sweep_dir or out_dir, config_hash)
    if previous is not None and save_to is not None and previous.saved_to != str(save_to):
        log.info("cell %s already done (%s) but not saved to %s; running it again", config_hash, previous.path,
                 save_to)
        previous = None
    if previous is not None:
        log.info("cell %s already done (%s); skipping", config_hash, previous.path)
        return previous
    out_dir = _own_dir(out_dir, config_hash, rerun)

    provenance.fix_numerics(cfg.threads)
    result = Result(
        status="running", config_hash=config_hash,
        cell=CellKey(model=cfg.model.name, method=cfg.method.name, sparsity=cfg.sparsity,
                     sparsity_type=str(cfg.method.pattern), protocol=cfg.protocol, seed=cfg.seed,
                     wbits=None, display=cfg.method.display, baseline=cfg.method.dense),
        config=resolved, provenance=provenance.provenance(), protocol=pipeline.protocol_record(cfg, resolved),
        process={"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                 "started": time.time()})
    records.write_result(out_dir, result)
    cell_progress = progress.Progress(out_dir)
    run = tracking.start(cfg.logger, result, out_dir, sweep_dir)
    observer = CellObserver(result, cell_progress, tracking.Live(run))
    started = time.perf_counter()
    try:
        pipeline.run(cfg, result, observer, cache, out_dir, save_to, config_hash)
        _check_metrics(result.metrics)
        result.status = "ok"
    except ConfigError as exc:  # bad input found late (e.g. an LLM without a chat template): one line
        log.error("cell failed: %s", exc)
        result.status = "failed"
        result.error = Failure(type(exc).__name__, str(exc), traceback.format_exc())
    except Exception as exc:  # recorded, not raised: the sweep goes on
        log.exception("cell failed")
        result.status = "failed"
        result.error = Failure(type(exc).__name__, str(exc), traceback.format_exc())
    except BaseException as exc:  # KeyboardInterrupt, or SystemExit from Submitit's requeue handler
        result.status = "interrupted"
        result.error = Failure(type(exc).__name__, str(exc), traceback.format_exc())
        raise
    finally:
        result.timings["total"] = time.perf_counter() - started
        result.peak_memory = provenance.peak_memory()
        result.path = str(records.write_result(out_dir, result))
        cell_progress.finish()
        if result.saved_to:  # the checkpoint's record gets the evaluation too
            checkpoint.write_recipe(Path(result.saved_to), result, result.config)
    if result.ok:  # after its result is written: a kill in between costs a re-run, never the work
        resume.clear(out_dir)
    tracking.log_cell(run, result)
    return result


def _save_target(cfg: RunConfig, out_dir: Path, sweep_dir: Optional[Path]) -> Optional[Path]:
    """Where the pruned checkpoint goes: `save_dir`, or in a sweep its subfolder named like the cell's dir."""
    if not cfg.save_dir:
        return None
    root = models.save_path(cfg.save_dir)
    return root if sweep_dir is None else root / out_dir.name


def _own_dir(out_dir: Path, config_hash: str, rerun: str) -> Path:
    """`out_dir`, unless its result.json must not be overwritten: an ok result (except this cell's own,
    re-run on purpose with +rerun=all), or a file that is not a readable result. Then the first free
    sibling `<out_dir>.1`, `.2`, ... (an earlier sweep into the same dir, a stray file)."""
    candidate, number = out_dir, 0
    while (candidate / records.RESULT_FILE).exists():
        try:
            existing = records.read_result(candidate / records.RESULT_FILE)
        except records.CorruptResult as exc:
            log.warning("%s is not a readable result (%s); leaving it alone", candidate / records.RESULT_FILE, exc)
        else:
            if not existing.ok or (rerun == "all" and existing.config_hash == config_hash):
                return candidate
        number += 1
        candidate = out_dir.with_name(f"{out_dir.name}.{number}")
    return candidate


def _check_metrics(metrics: dict, key: str = "metrics") -> None:
    """A NaN or infinite metric fails the cell: it is a broken model or evaluation, not a number."""
    for name, value in metrics.items():
        if isinstance(value, dict):
            _check_metrics(value, f"{key}.{name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"{key}.{name} is {value}: the model's outputs are not finite")
