"""One cell of a sweep: load -> calibrate -> prune -> (recover) -> (save) -> evaluate -> result record.

A failing cell records its exception and traceback in its result and returns normally, so one bad
cell never takes the rest of a sweep down. An interrupted one (Ctrl-C, or Submitit requeuing it on
preemption/timeout) records "interrupted" and re-raises; a killed one stays "running" with the host and
pid that ran it, so `python -m reports status` can tell it is dead. Neither counts as done on resume.

The cell knows the method only through its typed capabilities (`methods.base`): whether the pruner is
structured or quantizes, whether the method is the dense baseline, the allocator's block importance.
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
from bench import cache as caching
from bench import data, llm, models, protocol, provenance, speed, tracking, zeroshot
from bench.config import RunConfig
from bench.core import engine, families, perplexity, records
from bench.core.records import CellKey, Failure, Result
from methods import recovery

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
    resolved = cfg.identity(resolved)
    config_hash = provenance.config_hash(resolved)
    previous = None if rerun == "all" else find_completed(sweep_dir or out_dir, config_hash)
    if previous is not None:
        log.info("cell %s already done (%s); skipping", config_hash, previous.path)
        return previous

    provenance.fix_numerics(cfg.threads)
    result = Result(
        status="running", config_hash=config_hash,
        cell=CellKey(model=cfg.model.name, method=cfg.method.name, sparsity=cfg.sparsity,
                     sparsity_type=str(cfg.method.pattern), protocol=cfg.protocol, seed=cfg.seed,
                     wbits=None),
        config=resolved, provenance=provenance.provenance(), protocol=_protocol(cfg, resolved),
        process={"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                 "started": time.time()})
    records.write_result(out_dir, result)
    started = time.perf_counter()
    try:
        _run(cfg, result, cache)
        result.status = "ok"
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
        records.write_result(out_dir, result)
    tracking.log_cell(cfg.logger, result, out_dir, sweep_dir)
    return result


def _protocol(cfg: RunConfig, resolved: dict, actual: Optional[dict] = None) -> dict:
    """`Result.protocol`; with a preset's `paper_protocol`, also where ours differs from the paper's."""
    fingerprint = protocol.fingerprint(cfg, actual)
    paper = resolved.get("paper_protocol")
    if paper:
        fingerprint["paper_differences"] = protocol.protocol_differences(fingerprint["fields"], paper)
    return fingerprint


class _Stage:
    """`with _Stage(result, "load"):` records the wall time of the block under result.timings["load"]."""

    def __init__(self, result: Result, name: str):
        self.result, self.name = result, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.result.timings[self.name] = time.perf_counter() - self.start


def _run(cfg: RunConfig, result: Result, use_cache: bool) -> None:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with _Stage(result, "load"):
        model, tokenizer = models.load(cfg.model)
    shared = caching.for_cell(use_cache, cfg.model, cfg.method)

    def tokens(text: str) -> torch.Tensor:
        return shared.tokens(text, lambda: data.tokenize(tokenizer, text))

    with _Stage(result, "calib_data"):
        calib = cfg.data.calib
        corpus = data.load_corpus(calib.dataset, calib.split, cfg.data.dir, "calib", cfg.data.allow_fallback)
        _note_fallback(result, corpus, "calibration")

        def draw(nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
            if corpus.documents is not None:  # C4: the references' document sampler
                return data.document_samples(tokenizer, corpus.documents, nsamples, seqlen, seed)
            return data.calibration_samples(tokens(corpus.text), nsamples, seqlen, seed)

        samples = draw(calib.nsamples, calib.seqlen, cfg.seed)
        if corpus.fallback_for is not None:  # the protocol is what ran, not what was asked for
            result.protocol = _protocol(cfg, result.config, {"calib_dataset": f"pydoc (fallback for {calib.dataset})",
                                                             "calib_sampling": data.STREAM_SAMPLING})
        result.data = {"calib": {"dataset": corpus.name, "split": corpus.split, "source": corpus.source,
                                 "fallback_for": corpus.fallback_for, "nsamples": calib.nsamples,
                                 "seqlen": calib.seqlen}}

    method = methods.build(cfg.method)
    result.cell.wbits = method.pruner.bits
    structured = method.pruner.structured  # FFN channels removed physically
    if structured:
        dense_sizes, dense_params = families.ffn_sizes(model), families.parameter_count(model)
        reference = copy.deepcopy(model) if cfg.eval.speed else None
    report = engine.prune(model, method, samples, cfg.sparsity, cfg.device, cache=shared,
                          make_llm=llm.make_backend)
    result.timings.update(report.seconds)
    if structured:
        result.sparsity = {"target": cfg.sparsity, **families.structured_sparsity(model, dense_sizes, dense_params),
                           "allocated": report.rates}
    else:
        overall, per_layer = families.measured_sparsity(model)
        result.sparsity = {"target": cfg.sparsity, "measured": overall, "allocated": report.rates,
                           "per_layer": per_layer}
    result.allocator = report.details
    if cfg.recovery.enabled:
        windows = draw(cfg.recovery.windows, cfg.recovery.seqlen, cfg.seed + 1)
        model, result.recovery = recovery.recover(model, windows, samples, cfg.recovery,
                                                  method.allocator.block_weights, cfg.seed, cfg.device)
        result.timings["recovery"] = result.recovery["seconds"]

    if cfg.save_dir:
        with _Stage(result, "save"):
            models.save(model, tokenizer, cfg.save_dir)
            result.saved_to = str(Path(cfg.save_dir).expanduser().resolve())

    if cfg.eval.ppl is not None:
        _perplexities(cfg, result, model, tokens, shared)
        if list(result.metrics["ppl"]) != cfg.eval.ppl.datasets:  # an eval corpus fell back to pydoc
            actual = {**result.protocol["fields"], "eval_datasets": list(result.metrics["ppl"])}
            result.protocol = _protocol(cfg, result.config, actual)
    if cfg.eval.zeroshot is not None:
        with _Stage(result, "eval_zeroshot"):
            result.metrics["zeroshot"] = zeroshot.evaluate(model, tokenizer, cfg.eval.zeroshot, cfg.device, cfg.seed)
            # local task YAMLs carry the real task names: the record says they are mirrors
            result.metrics["zeroshot"]["mirror"] = cfg.eval.zeroshot.include_path is not None
    if structured and reference is not None:
        with _Stage(result, "speed"):
            result.metrics["speed"] = speed.measure(reference, model, cfg.eval.speed, cfg.device, cfg.seed)
    result.cache = shared.report


def _perplexities(cfg: RunConfig, result: Result, model, tokens, shared: caching.CellCache) -> None:
    ppl_cfg = cfg.eval.ppl
    result.metrics["ppl"] = {}
    result.data["eval"] = {}
    for name in ppl_cfg.datasets:
        with _Stage(result, f"eval_ppl_{name}"):
            corpus = data.load_corpus(name, ppl_cfg.split, cfg.data.dir, "eval", cfg.data.allow_fallback)
            _note_fallback(result, corpus, "evaluation")
            windows = data.eval_windows(tokens(corpus.text), ppl_cfg.seqlen, ppl_cfg.max_windows, corpus.name)
            desc = f"ppl {corpus.name}"

            def evaluate() -> float:
                return perplexity.perplexity(model, windows, cfg.device, desc=desc)

            # the dense model's ppl is the same in every cell
            ppl = shared.dense_ppl(windows, cfg.device, evaluate) if cfg.method.dense else evaluate()
            key = name if corpus.fallback_for is None else f"{name}(pydoc fallback)"
            result.metrics["ppl"][key] = ppl
            result.data["eval"][key] = {"dataset": corpus.name, "split": corpus.split, "source": corpus.source,
                                        "seqlen": ppl_cfg.seqlen, "windows": int(windows.shape[0])}
        log.info("%s %s %.0f%%: %s ppl = %.3f", cfg.model.name, cfg.method.name, 100 * cfg.sparsity, key, ppl)


def _note_fallback(result: Result, corpus: data.Corpus, purpose: str) -> None:
    if corpus.fallback_for is not None:
        result.warnings.append(f"{purpose}: {corpus.fallback_for} not found; used the offline pydoc corpus "
                               f"(not comparable with papers)")
