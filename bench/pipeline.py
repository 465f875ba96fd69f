"""The recipe of one cell, top to bottom: load, calibrate, prune, (recover), (save), perplexity,
zero-shot, speed. It runs over a model source (`bench.source`): the whole model in memory, or its
blocks streamed from shards (`bench.streaming.Streamed`); the source does what differs between the two.
Stages and steps go to the cell's observer (`bench.observer`): timings, progress.json and W&B.

The cell knows the method only through its typed capabilities (`methods.base`): whether the pruner is
structured or quantizes, whether the method is the dense baseline, the allocator's block importance.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Optional

import torch

from bench import cache as caching
from bench import data, models, protocol, streaming, tokenization
from bench.config import RunConfig
from bench.core.records import Result
from bench.core.vocab import ConfigError
from bench.observer import CellObserver
from bench.source import InMemory, ModelSource
from methods import catalog

log = logging.getLogger(__name__)


def run(cfg: RunConfig, result: Result, observer: CellObserver, use_cache: bool, out_dir: Path,
        save_to: Optional[Path], config_hash: str) -> None:
    """Run the cell into `result` (`use_cache`: reuse what other cells computed, bench/cache.py)."""
    if save_to is not None:
        models.check_save_dir(save_to)  # before any work, not after an hour of pruning
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    _check_devices(cfg)
    if streaming.should_stream(cfg.model):
        source: ModelSource = streaming.Streamed(cfg, result, observer, save_to)
    else:
        source = InMemory(cfg, result, observer, save_to, out_dir, config_hash)
    tokenizer = source.load()

    shared = caching.for_cell(use_cache, cfg.model, cfg.method)

    def tokens(text: str) -> torch.Tensor:
        return shared.tokens(text, lambda: tokenization.tokenize(tokenizer, text))

    with observer.stage("calib_data"):
        draw = _calibration(cfg, result, tokenizer, tokens)
        samples = draw(cfg.data.calib.nsamples, cfg.data.calib.seqlen, cfg.seed)

    method = catalog.build(cfg.method)
    result.cell.wbits = method.pruner.bits
    report = source.prune(method, samples, shared)
    result.allocator = report.details
    result.warnings += report.details.get("warnings", [])  # e.g. a search whose LLM operators fell back
    if cfg.recovery.enabled:  # windows from the calibration sampler, never the evaluation split
        source.recover(draw(cfg.recovery.windows, cfg.recovery.seqlen, cfg.seed + 1), samples,
                       method.allocator.block_weights)
    if save_to is not None:
        source.save(tokenizer)

    if cfg.eval.ppl is not None:
        _perplexities(cfg, result, observer, tokens, lambda windows, desc: source.perplexity(windows, desc, shared))
    if cfg.eval.zeroshot is not None:
        with observer.stage("eval_zeroshot"):
            result.metrics["zeroshot"] = source.zeroshot(tokenizer)
            # local task YAMLs carry the real task names: the record says they are mirrors
            result.metrics["zeroshot"]["mirror"] = cfg.eval.zeroshot.include_path is not None
        observer.measured(_values(result, "acc", "acc_avg"))
    if source.measures_speed:
        with observer.stage("speed"):
            result.metrics["speed"] = source.speed()
        observer.measured(_values(result, "speedup"))
    result.cache = shared.report
    result.warnings += shared.warnings


def protocol_record(cfg: RunConfig, resolved: dict, actual: Optional[dict] = None) -> dict:
    """`Result.protocol`; with a preset's `paper_protocol`, also where ours differs from the paper's."""
    fingerprint = protocol.fingerprint(cfg, actual)
    paper = resolved.get("paper_protocol")
    if paper:
        fingerprint["paper_differences"] = protocol.protocol_differences(fingerprint["fields"], paper)
    return fingerprint


def _calibration(cfg: RunConfig, result: Result, tokenizer, tokens: Callable[[str], torch.Tensor]
                 ) -> Callable[[int, int, int], torch.Tensor]:
    """The calibration sampler draw(nsamples, seqlen, seed) of the cell's corpus, which it records in
    `result.data` (and, when the corpus fell back, in `result.protocol`: what ran, not what was asked)."""
    calib = cfg.data.calib
    corpus = _corpus(cfg, calib.dataset, calib.split, "calib")
    _note_fallback(result, corpus, "calibration")

    def draw(nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
        if corpus.documents is not None:  # C4: the references' document sampler
            return tokenization.document_samples(tokenizer, corpus.documents, nsamples, seqlen, seed)
        return tokenization.calibration_samples(tokens(corpus.text), nsamples, seqlen, seed, key=corpus.key)

    if corpus.fallback_for is not None:
        result.protocol = protocol_record(cfg, result.config, {
            "calib_dataset": f"pydoc (fallback for {calib.dataset})", "calib_sampling": data.STREAM_SAMPLING})
    result.data = {"calib": {"dataset": corpus.name, "split": corpus.split, "source": corpus.source,
                             "fallback_for": corpus.fallback_for, "nsamples": calib.nsamples,
                             "seqlen": calib.seqlen}}
    return draw


def _perplexities(cfg: RunConfig, result: Result, observer: CellObserver, tokens,
                  measure: Callable[[torch.Tensor, str], float]) -> None:
    """The perplexity of every eval corpus, by `measure(windows, desc)`."""
    ppl_cfg = cfg.eval.ppl
    result.metrics["ppl"], result.data["eval"] = {}, {}
    for name in ppl_cfg.datasets:
        with observer.stage(f"eval_ppl_{name}"):
            corpus = _corpus(cfg, name, ppl_cfg.split, "eval")
            _note_fallback(result, corpus, "evaluation")
            windows = tokenization.eval_windows(tokens(corpus.text), ppl_cfg.seqlen, ppl_cfg.max_windows, corpus.name,
                                        key=corpus.key)
            key = name if corpus.fallback_for is None else f"{name}(pydoc fallback)"
            ppl = result.metrics["ppl"][key] = measure(windows, f"ppl {corpus.name}")
            observer.measured({f"ppl/{key}": ppl})
            result.data["eval"][key] = {"dataset": corpus.name, "split": corpus.split, "source": corpus.source,
                                        "seqlen": ppl_cfg.seqlen, "windows": int(windows.shape[0])}
        log.info("%s %s %.0f%%: %s ppl = %.3f", cfg.model.name, cfg.method.name, 100 * cfg.sparsity, key, ppl)
    if list(result.metrics["ppl"]) != ppl_cfg.datasets:  # an eval corpus fell back to pydoc
        actual = {**result.protocol["fields"], "eval_datasets": list(result.metrics["ppl"])}
        result.protocol = protocol_record(cfg, result.config, actual)


def _values(result: Result, *families: str) -> dict[str, float]:
    """The result's metrics of these families (`METRICS` names), for the observer as they are measured."""
    return {name: value for name, value in result.metric_values().items() if name.partition("/")[0] in families}


def _check_devices(cfg: RunConfig) -> None:
    """At run time, not validation: a sweep is validated on the submitting host, which may have no GPU."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible on this host; allowed here: cpu")
    gpus = cfg.model.resources.gpus
    if cfg.device == "cuda" and gpus > torch.cuda.device_count():
        raise ConfigError(f"model.resources.gpus={gpus} but this host has {torch.cuda.device_count()} GPU(s); "
                          f"allowed: 0..{torch.cuda.device_count()}")


def _corpus(cfg: RunConfig, name: str, split: str, purpose: str) -> data.Corpus:
    return data.load_corpus(name, split, cfg.data.dir, purpose, cfg.data.allow_fallback, path=cfg.data.path,
                            fmt=cfg.data.format, field=cfg.data.field, label=cfg.data.name)


def _note_fallback(result: Result, corpus: data.Corpus, purpose: str) -> None:
    if corpus.fallback_for is not None:
        result.warnings.append(f"{purpose}: {corpus.fallback_for} not found; used the offline pydoc corpus "
                               f"(not comparable with papers)")
