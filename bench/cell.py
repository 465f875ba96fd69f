"""One cell of a sweep: load -> calibrate -> prune -> (save) -> evaluate -> result JSON.

A failing cell records its exception and traceback in its result and returns normally, so one bad
cell never takes the rest of a sweep down. An interrupted one (Ctrl-C, or Submitit requeuing it on
preemption/timeout) records "interrupted" and re-raises; a killed one stays "running" with the host and
pid that ran it, so `python -m reports status` can tell it is dead. Neither counts as done on resume.
"""
from __future__ import annotations

import copy
import logging
import os
import random
import socket
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

import methods
from bench import arch, data, engine, evaluate, models, results, speed, zeroshot
from bench import cache as caching
from bench.arch import measured_sparsity
from bench.config import RunConfig

log = logging.getLogger(__name__)


def find_completed(root: Optional[Path], config_hash: str) -> Optional[dict]:
    """A finished result with this config hash anywhere under `root` (the sweep dir), if any."""
    if root is None or not root.exists():
        return None
    for result in results.read_results(root):
        if result.get("config_hash") == config_hash and result.get("status") == "ok":
            return result
    return None


def identity(cfg: RunConfig, resolved: dict) -> dict:
    """The resolved config a cell is hashed by: with the effective sparsity (dense ignores the sweep axis)."""
    return {**resolved, "sparsity": cfg.sparsity}


def run_cell(cfg: RunConfig, resolved: dict, out_dir: Path, sweep_dir: Optional[Path] = None,
             rerun: str = "failed", cache: bool = False) -> dict:
    """`rerun="failed"` returns an existing ok result with the same config hash instead of running;
    `rerun="all"` always runs. `cache`: reuse what other cells computed (bench/cache.py)."""
    out_dir = Path(out_dir)
    resolved = identity(cfg, resolved)
    result_path = out_dir / results.RESULT_FILE
    config_hash = results.config_hash(resolved)
    previous = None if rerun == "all" else find_completed(sweep_dir or out_dir, config_hash)
    if previous is not None:
        log.info("cell %s already done (%s); skipping", config_hash, previous["path"])
        return previous

    result = {
        "schema": results.SCHEMA_VERSION,
        "status": "running",
        "config_hash": config_hash,
        "cell": {"model": cfg.model.name, "method": cfg.method.name, "sparsity": cfg.sparsity,
                 "sparsity_type": str(cfg.method.pattern), "protocol": cfg.protocol, "seed": cfg.seed,
                 "wbits": getattr(cfg.method.pruner_options, "wbits", None)},
        "config": resolved,
        "provenance": results.provenance(),
        "timings": {},
        "warnings": [],
        "metrics": {},
        "error": None,
        "process": {"host": socket.gethostname(), "pid": os.getpid(),
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()},
    }
    results.write_json_atomic(result_path, result)
    timings = result["timings"]
    started = time.perf_counter()
    try:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        stage = time.perf_counter()
        model, tokenizer = models.load(cfg.model)
        timings["load"] = time.perf_counter() - stage
        shared = caching.for_cell(cache, cfg.model, cfg.method)

        def tokens(text: str):
            return shared.tokens(text, lambda: data.tokenize(tokenizer, text))

        stage = time.perf_counter()
        calib = cfg.data.calib
        corpus = data.load_corpus(calib.dataset, calib.split, cfg.data.dir, "calib", cfg.data.allow_fallback)
        _note_fallback(result, corpus, "calibration")
        calib_ids = tokens(corpus.text)
        samples = data.calibration_samples(calib_ids, calib.nsamples, calib.seqlen, cfg.seed)
        result["data"] = {"calib": {"dataset": corpus.name, "split": corpus.split, "source": corpus.source,
                                    "fallback_for": corpus.fallback_for, "nsamples": calib.nsamples,
                                    "seqlen": calib.seqlen}}
        timings["calib_data"] = time.perf_counter() - stage

        method = methods.build(cfg.method)
        structured = getattr(method.pruner, "structured", False)  # FFN channels removed physically
        if structured:
            dense_sizes, dense_params = arch.ffn_sizes(model), arch.parameter_count(model)
            reference = copy.deepcopy(model) if cfg.eval.speed else None
        report = engine.prune(model, method, samples, cfg.sparsity, cfg.device, cache=shared)
        timings.update(report.seconds)
        if structured:
            result["sparsity"] = {"target": cfg.sparsity, **arch.structured_sparsity(model, dense_sizes, dense_params),
                                  "allocated": report.rates}
            if method.pruner.options.recovery != "none":
                model, result["recovery"] = _recover(model, method, calib_ids, samples, cfg)
                timings["recovery"] = result["recovery"]["seconds"]
        else:
            overall, per_layer = measured_sparsity(model)
            result["sparsity"] = {"target": cfg.sparsity, "measured": overall, "allocated": report.rates,
                                  "per_layer": per_layer}
        if report.details:
            result["allocator"] = report.details

        if cfg.save_dir:
            stage = time.perf_counter()
            models.save(model, tokenizer, cfg.save_dir)
            result["saved_to"] = str(Path(cfg.save_dir).expanduser().resolve())
            timings["save"] = time.perf_counter() - stage

        if cfg.eval.ppl is not None:
            ppl_cfg = cfg.eval.ppl
            result["metrics"]["ppl"] = {}
            result["data"]["eval"] = {}
            for name in ppl_cfg.datasets:
                stage = time.perf_counter()
                corpus = data.load_corpus(name, ppl_cfg.split, cfg.data.dir, "eval", cfg.data.allow_fallback)
                _note_fallback(result, corpus, "evaluation")
                windows = data.eval_windows(tokens(corpus.text), ppl_cfg.seqlen, ppl_cfg.max_windows, corpus.name)
                desc = f"ppl {corpus.name}"
                if cfg.method.pruner == "none":  # the dense model's ppl is the same in every cell
                    ppl = shared.dense_ppl(windows, cfg.device,
                                           lambda: evaluate.perplexity(model, windows, cfg.device, desc=desc))
                else:
                    ppl = evaluate.perplexity(model, windows, cfg.device, desc=desc)
                key = name if corpus.fallback_for is None else f"{name}(pydoc fallback)"
                result["metrics"]["ppl"][key] = ppl
                result["data"]["eval"][key] = {"dataset": corpus.name, "split": corpus.split,
                                               "source": corpus.source, "seqlen": ppl_cfg.seqlen,
                                               "windows": int(windows.shape[0])}
                timings[f"eval_ppl_{name}"] = time.perf_counter() - stage
                log.info("%s %s %.0f%%: %s ppl = %.3f", cfg.model.name, cfg.method.name, 100 * cfg.sparsity,
                         key, ppl)
        if cfg.eval.zeroshot is not None:
            stage = time.perf_counter()
            result["metrics"]["zeroshot"] = zeroshot.evaluate(model, tokenizer, cfg.eval.zeroshot, cfg.device, cfg.seed)
            timings["eval_zeroshot"] = time.perf_counter() - stage
        if structured and reference is not None:
            stage = time.perf_counter()
            result["metrics"]["speed"] = speed.measure(reference, model, cfg.eval.speed, cfg.device, cfg.seed)
            timings["speed"] = time.perf_counter() - stage
        result["cache"] = shared.report
        result["status"] = "ok"
    except Exception as exc:  # recorded, not raised: the sweep goes on
        log.exception("cell failed")
        result["status"] = "failed"
        result["error"] = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    except BaseException as exc:  # KeyboardInterrupt, or SystemExit from Submitit's requeue handler
        result["status"] = "interrupted"
        result["error"] = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        raise
    finally:
        timings["total"] = time.perf_counter() - started
        result["peak_memory"] = results.peak_memory()
        results.write_json_atomic(result_path, result)
    if cfg.logger.name != "none":
        from reports.wandb_log import log_cell

        log_cell(cfg.logger, result, out_dir, sweep_dir)
    return result


def _recover(model, method, calib_ids, samples, cfg: RunConfig):
    from methods import recovery
    from methods.allocators import cfsp_coarse

    weights = getattr(method.allocator, "block_weights", None)
    if method.pruner.options.recovery == "ig_lora" and not weights:  # no coarse scores from the allocator
        weights = cfsp_coarse.sigmoid_scores(cfsp_coarse.block_distances(model, samples, cfg.device), a=1.0)
    return recovery.recover(model, calib_ids, method.pruner.options, weights, cfg.seed, cfg.device)


def _note_fallback(result: dict, corpus: data.Corpus, purpose: str) -> None:
    if corpus.fallback_for is not None:
        result["warnings"].append(f"{purpose}: {corpus.fallback_for} not found; used the offline pydoc corpus "
                                  f"(not comparable with papers)")
