"""Benchmark (not a test): where SparseGPT's time goes, and what sharing input statistics saves.

    python scripts/bench_sparsegpt.py [--model smollm2-135m] [--nsamples 32] [--seqlen 512] [--sparsity 0.5]

1. One SparseGPT run at the given sparsity, with wall time per stage (block-0 capture, block forwards
   with hooks, Hessian accumulation, OBS solves, re-running pruned blocks) and peak RSS.
2. Two statistics-only passes over the dense model in the same process: X^T X accumulated once per
   input group (q/k/v, gate/up share one) vs once per linear; prints the ratio.
Wall times on a shared machine are noisy; the ratios within this one run are the result.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from bench import data, models, provenance
from bench.compose import compose
from bench.config import validate
from bench.core import engine
from methods.pruners.sparsegpt import SparseGPT
from methods import catalog, lifecycle


@contextmanager
def timed(target, attribute: str, totals: dict, key: str):
    """Accumulate wall time of every call of target.attribute into totals[key] while active."""
    original = getattr(target, attribute)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(target, attribute, wrapper)
    try:
        yield
    finally:
        setattr(target, attribute, original)


def stats_pass_seconds(model, samples, share: bool) -> tuple[float, float]:
    """(total seconds, seconds inside the statistics hooks) of one observe-only pass."""
    totals = defaultdict(float)
    start = time.perf_counter()
    with timed(engine._Accumulator, "__call__", totals, "hooks"):
        engine.traverse(model, samples, "cpu", "full", lambda view: None, edits=False,
                        desc=f"stats ({'shared' if share else 'per linear'})", share_stats=share)
    return time.perf_counter() - start, totals["hooks"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/bench_sparsegpt.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args(argv)

    cfg = validate(compose([f"model={args.model}", "method=sparsegpt", f"sparsity={args.sparsity}",
                   f"data.calib.nsamples={args.nsamples}", f"data.calib.seqlen={args.seqlen}"]))
    model, tokenizer = models.load(cfg.model)
    corpus = data.load_corpus(cfg.data.calib.dataset, cfg.data.calib.split, cfg.data.dir, "calib",
                              cfg.data.allow_fallback)
    samples = data.calibration_samples(data.tokenize(tokenizer, corpus.text), args.nsamples, args.seqlen, cfg.seed)
    print(f"model {args.model}, calibration {corpus.name}/{corpus.split} {args.nsamples} x {args.seqlen} tokens, "
          f"torch threads {torch.get_num_threads()}")

    shared_total, shared_hooks = stats_pass_seconds(model, samples, share=True)
    separate_total, separate_hooks = stats_pass_seconds(model, samples, share=False)

    totals = defaultdict(float)
    start = time.perf_counter()
    with timed(engine, "capture_inputs", totals, "capture block-0 inputs"), \
            timed(engine, "run_block", totals, "block forwards (with hooks, then pruned)"), \
            timed(engine._Accumulator, "__call__", totals, "Hessian accumulation (inside forwards)"), \
            timed(SparseGPT, "prune_linear", totals, "OBS solves"):
        lifecycle.prune(model, catalog.build(cfg.method), samples, args.sparsity, "cpu")
    total = time.perf_counter() - start

    print(f"\nSparseGPT {args.sparsity:.0%}: {total:.1f} s total")
    for stage, seconds in totals.items():
        print(f"  {stage:45s} {seconds:8.1f} s  ({seconds / total:5.1%})")
    print(f"  peak RSS {provenance.peak_memory()['rss_mb']:.0f} MB")
    print("\nInput statistics, one dense pass each (same process):")
    print(f"  shared per input group : {shared_total:7.1f} s total, {shared_hooks:7.1f} s in hooks")
    print(f"  per linear             : {separate_total:7.1f} s total, {separate_hooks:7.1f} s in hooks")
    print(f"  speed-up from sharing  : {separate_hooks / shared_hooks:.2f}x on accumulation, "
          f"{separate_total / shared_total:.2f}x on the pass")


if __name__ == "__main__":
    main()
