"""One cell of a sweep: load -> calibrate -> prune -> (recover) -> (save) -> evaluate -> result record.

A failing cell records its exception and traceback in its result and returns normally, so one bad
cell never takes the rest of a sweep down. An interrupted one (Ctrl-C, or Submitit requeuing it on
preemption/timeout) records "interrupted" and re-raises; a killed one stays "running" with the host and
pid that ran it, so `python -m reports status` can tell it is dead. Neither counts as done on resume;
run again into the same dir, either goes on from its last saved pruned block (bench/resume.py), and its
result says so (`process.resumed_from_block`).

The cell knows the method only through its typed capabilities (`methods.base`): whether the pruner is
structured or quantizes, whether the method is the dense baseline, the allocator's block importance.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
import socket
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers

from bench import cache as caching
from bench import (checkpoint, data, llm, models, progress, protocol, provenance, resume, speed, streaming, tracking,
                   zeroshot)
from bench.config import RunConfig
from bench.core import families, perplexity, records
from bench.core.records import CellKey, Failure, Result
from bench.core.vocab import ConfigError
from methods import catalog, lifecycle, recovery

log = logging.getLogger(__name__)

# A structured method whose channel rounding moves the achieved sparsity further than this from the
# target gets a warning in its result (and so in the table's footnotes).
STRUCTURED_TOLERANCE = 0.05


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
                     wbits=None, display=cfg.method.display),
        config=resolved, provenance=provenance.provenance(), protocol=_protocol(cfg, resolved),
        process={"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                 "started": time.time()})
    records.write_result(out_dir, result)
    progress.start(out_dir)
    run = tracking.start(cfg.logger, result, out_dir, sweep_dir)
    started = time.perf_counter()
    try:
        _run(cfg, result, cache, out_dir, save_to, config_hash)
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
        records.write_result(out_dir, result)
        progress.finish()
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
    root = Path(cfg.save_dir).expanduser().absolute()
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


def _check_finite(model, when: str) -> None:
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all()]
    if bad:
        raise FloatingPointError(f"{len(bad)} tensors hold NaN or inf {when}: {', '.join(bad[:5])}"
                                 + (" ..." if len(bad) > 5 else ""))


def _check_positions(model, cfg: RunConfig) -> None:
    """model.seqlen and the windows cut from it must fit the checkpoint's position table."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and cfg.model.seqlen > limit:
        raise ConfigError(f"model.seqlen={cfg.model.seqlen} is out of range; allowed: 1..{limit} (the "
                          f"max_position_embeddings of the loaded checkpoint of model {cfg.model.name})")


def _check_structured(result: Result, target: float) -> None:
    achieved = result.sparsity["measured"]
    if abs(achieved - target) > STRUCTURED_TOLERANCE:
        result.warnings.append(f"structured pruning removed {achieved:.1%} of FFN channels for a target of "
                               f"{target:.1%} (channel rounding, e.g. method.round_to; tolerance "
                               f"{STRUCTURED_TOLERANCE:.0%})")


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
        progress.stage(self.name)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.result.timings[self.name] = time.perf_counter() - self.start
        tracking.log_live({f"time/{self.name}": self.result.timings[self.name]})


def _on_step(name: str, index: int, total: int, seconds: float) -> None:
    """The `on_step` of the engine and of perplexity: progress.json hears of every step, the W&B run of
    the pruning passes' (perplexity's windows would only crowd its charts)."""
    progress.step(name, index, total)
    if name in lifecycle.PRUNE_STEPS:
        tracking.log_step(name, index, seconds)


def _cache_and_samples(cfg: RunConfig, result: Result, tokenizer, use_cache: bool):
    """The cell's cache, its cached tokenizer, the calibration sampler draw(nsamples, seqlen, seed) (recovery
    draws its windows from it too) and the calibration samples: the same for in-memory and streamed cells."""
    shared = caching.for_cell(use_cache, cfg.model, cfg.method)

    def tokens(text: str) -> torch.Tensor:
        return shared.tokens(text, lambda: data.tokenize(tokenizer, text))

    with _Stage(result, "calib_data"):
        draw = _calibration(cfg, result, tokenizer, tokens)
        samples = draw(cfg.data.calib.nsamples, cfg.data.calib.seqlen, cfg.seed)
    return shared, tokens, draw, samples


def _run(cfg: RunConfig, result: Result, use_cache: bool, out_dir: Path, save_to: Optional[Path],
         config_hash: str) -> None:
    if save_to is not None:
        models.check_save_dir(save_to)  # before any work, not after an hour of pruning
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    _check_devices(cfg)
    if streaming.should_stream(cfg.model):
        _run_streamed(cfg, result, use_cache, save_to)
        return
    # the zero-shot tasks and their data before the model and the prune: unreachable data fails in one line
    tasks = zeroshot.load_tasks(cfg.eval.zeroshot) if cfg.eval.zeroshot is not None else None
    with _Stage(result, "load"):
        model, tokenizer = models.load(cfg.model)
    _check_positions(model, cfg)
    _check_finite(model, "after loading")
    shared, tokens, draw, samples = _cache_and_samples(cfg, result, tokenizer, use_cache)

    method = catalog.build(cfg.method)
    result.cell.wbits = method.pruner.bits
    structured = method.pruner.structured  # FFN channels removed physically
    if structured:
        dense_sizes, dense_params = families.ffn_sizes(model), families.parameter_count(model)
        reference = copy.deepcopy(model) if cfg.eval.speed else None
    progress.stage("prune")
    store = None if cfg.resume_every_s is None else resume.ResumeState(out_dir, config_hash, cfg.device,
                                                                       cfg.resume_every_s)
    report = lifecycle.prune(model, method, samples, cfg.sparsity, cfg.device, cache=shared,
                             make_llm=llm.make_backend, on_step=_on_step, batch=cfg.data.calib.batch, resume=store)
    if store is not None:
        result.warnings += store.warnings
    if report.resumed_from is not None:
        result.process["resumed_from_block"] = report.resumed_from
    result.timings.update(report.seconds)
    tracking.log_live({f"time/{stage}": seconds for stage, seconds in report.seconds.items()})
    _check_finite(model, f"after pruning with {cfg.method.name}")
    if structured:
        result.sparsity = {"target": cfg.sparsity, **families.structured_sparsity(model, dense_sizes, dense_params),
                           "allocated": report.rates}
        _check_structured(result, cfg.sparsity)
    else:
        overall, per_layer = families.measured_sparsity(model)
        result.sparsity = {"target": cfg.sparsity, "measured": overall, "allocated": report.rates,
                           "per_layer": per_layer}
    result.allocator = report.details
    result.warnings += report.details.get("warnings", [])  # e.g. a search whose LLM operators fell back
    if cfg.recovery.enabled:
        windows = draw(cfg.recovery.windows, cfg.recovery.seqlen, cfg.seed + 1)
        model, result.recovery = recovery.recover(model, windows, samples, cfg.recovery,
                                                  method.allocator.block_weights, cfg.seed, cfg.device)
        result.timings["recovery"] = result.recovery["seconds"]

    if save_to is not None:
        with _Stage(result, "save"):
            result.saved_to = str(models.save(model, tokenizer, save_to, result, result.config, cfg.save_format))

    if cfg.eval.ppl is not None:
        def measure(windows: torch.Tensor, desc: str) -> float:
            def evaluate() -> float:
                return perplexity.perplexity(model, windows, cfg.device, desc=desc,
                                             layerwise=cfg.eval.ppl.layerwise, on_step=_on_step)
            # the dense model's ppl is the same in every cell
            return shared.dense_ppl(windows, cfg.device, evaluate) if cfg.method.dense else evaluate()

        _perplexities(cfg, result, tokens, measure)
    if cfg.eval.zeroshot is not None:
        with _Stage(result, "eval_zeroshot"):
            result.metrics["zeroshot"] = zeroshot.evaluate(model, tokenizer, cfg.eval.zeroshot, cfg.device, cfg.seed,
                                                           out_dir, tasks)
            # local task YAMLs carry the real task names: the record says they are mirrors
            result.metrics["zeroshot"]["mirror"] = cfg.eval.zeroshot.include_path is not None
        _log_measured(result, "acc", "acc_avg")
    if structured and reference is not None:
        with _Stage(result, "speed"):
            result.metrics["speed"] = speed.measure(reference, model, cfg.eval.speed, cfg.device, cfg.seed)
        _log_measured(result, "speedup")
    result.cache = shared.report
    result.warnings += shared.warnings


def _perplexities(cfg: RunConfig, result: Result, tokens, measure: Callable[[torch.Tensor, str], float]) -> None:
    """The perplexity of every eval corpus, by `measure(windows, desc)`: in memory or streamed from shards."""
    ppl_cfg = cfg.eval.ppl
    result.metrics["ppl"], result.data["eval"] = {}, {}
    for name in ppl_cfg.datasets:
        with _Stage(result, f"eval_ppl_{name}"):
            corpus = _corpus(cfg, name, ppl_cfg.split, "eval")
            _note_fallback(result, corpus, "evaluation")
            windows = data.eval_windows(tokens(corpus.text), ppl_cfg.seqlen, ppl_cfg.max_windows, corpus.name,
                                        key=corpus.key)
            key = name if corpus.fallback_for is None else f"{name}(pydoc fallback)"
            ppl = result.metrics["ppl"][key] = measure(windows, f"ppl {corpus.name}")
            tracking.log_live({f"ppl/{key}": ppl})
            result.data["eval"][key] = {"dataset": corpus.name, "split": corpus.split, "source": corpus.source,
                                        "seqlen": ppl_cfg.seqlen, "windows": int(windows.shape[0])}
        log.info("%s %s %.0f%%: %s ppl = %.3f", cfg.model.name, cfg.method.name, 100 * cfg.sparsity, key, ppl)
    if list(result.metrics["ppl"]) != ppl_cfg.datasets:  # an eval corpus fell back to pydoc
        actual = {**result.protocol["fields"], "eval_datasets": list(result.metrics["ppl"])}
        result.protocol = _protocol(cfg, result.config, actual)


def _log_measured(result: Result, *families: str) -> None:
    """Log the result's metrics of these families (`METRICS` names) to the cell's W&B run as they are measured."""
    tracking.log_live({name: value for name, value in result.metric_values().items()
                       if name.partition("/")[0] in families})


def _check_devices(cfg: RunConfig) -> None:
    """At run time, not validation: a sweep is validated on the submitting host, which may have no GPU."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible on this host; allowed here: cpu")
    gpus = cfg.model.resources.gpus
    if cfg.device == "cuda" and gpus > torch.cuda.device_count():
        raise ConfigError(f"model.resources.gpus={gpus} but this host has {torch.cuda.device_count()} GPU(s); "
                          f"allowed: 0..{torch.cuda.device_count()}")


def _calibration(cfg: RunConfig, result: Result, tokenizer, tokens: Callable[[str], torch.Tensor]
                 ) -> Callable[[int, int, int], torch.Tensor]:
    """The calibration sampler draw(nsamples, seqlen, seed) of the cell's corpus, which it records in
    `result.data` (and, when the corpus fell back, in `result.protocol`: what ran, not what was asked)."""
    calib = cfg.data.calib
    corpus = _corpus(cfg, calib.dataset, calib.split, "calib")
    _note_fallback(result, corpus, "calibration")

    def draw(nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
        if corpus.documents is not None:  # C4: the references' document sampler
            return data.document_samples(tokenizer, corpus.documents, nsamples, seqlen, seed)
        return data.calibration_samples(tokens(corpus.text), nsamples, seqlen, seed, key=corpus.key)

    if corpus.fallback_for is not None:
        result.protocol = _protocol(cfg, result.config, {"calib_dataset": f"pydoc (fallback for {calib.dataset})",
                                                         "calib_sampling": data.STREAM_SAMPLING})
    result.data = {"calib": {"dataset": corpus.name, "split": corpus.split, "source": corpus.source,
                             "fallback_for": corpus.fallback_for, "nsamples": calib.nsamples,
                             "seqlen": calib.seqlen}}
    return draw


def _run_streamed(cfg: RunConfig, result: Result, use_cache: bool, save_to: Optional[Path]) -> None:
    """The cell with the model never whole in memory (bench/streaming.py): blocks are read from
    model.path's shards when the engine reaches them, pruned, written to the cell's save folder and
    dropped; perplexity is computed layer-wise from the written shards. config.validate refuses what
    cannot stream."""
    if save_to is None:
        raise ConfigError("model.stream=auto chose streaming (the checkpoint exceeds model.host_memory_gb) and "
                          "needs save_dir for the pruned checkpoint; set save_dir or model.stream=false")
    source = Path(cfg.model.path).expanduser()
    target = Path(save_to).expanduser()
    dtype = getattr(torch, cfg.model.dtype)
    result.warnings.append(f"streamed from {source} ({streaming.checkpoint_bytes(source) / 2**30:.2f} GiB)")
    with _Stage(result, "load"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    shared, tokens, _, samples = _cache_and_samples(cfg, result, tokenizer, use_cache)
    method = catalog.build(cfg.method)
    result.cell.wbits = method.pruner.bits
    evaluated = source
    if not cfg.method.dense:
        stream, report = streaming.prune_streamed(source, target, method, samples, cfg.sparsity, cfg.device, dtype,
                                                  cache=shared, on_step=_on_step, batch=cfg.data.calib.batch)
        tokenizer.save_pretrained(target)
        checkpoint.write_recipe(target, result, result.config)
        result.timings.update(report.seconds)
        tracking.log_live({f"time/{stage}": seconds for stage, seconds in report.seconds.items()})
        result.sparsity = {"target": cfg.sparsity, "measured": stream.sparsity, "allocated": report.rates}
        result.allocator = report.details
        result.saved_to = str(target.resolve())
        evaluated = target
    if cfg.eval.ppl is not None:
        _perplexities(cfg, result, tokens, lambda windows, desc: streaming.streamed_perplexity(
            evaluated, windows, cfg.device, dtype, on_step=_on_step))
    result.cache = shared.report
    result.warnings += shared.warnings


def _corpus(cfg: RunConfig, name: str, split: str, purpose: str) -> data.Corpus:
    return data.load_corpus(name, split, cfg.data.dir, purpose, cfg.data.allow_fallback, path=cfg.data.path,
                            fmt=cfg.data.format, field=cfg.data.field, label=cfg.data.name)


def _note_fallback(result: Result, corpus: data.Corpus, purpose: str) -> None:
    if corpus.fallback_for is not None:
        result.warnings.append(f"{purpose}: {corpus.fallback_for} not found; used the offline pydoc corpus "
                               f"(not comparable with papers)")
