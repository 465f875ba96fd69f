"""Benchmark: layer-wise perplexity with several windows per block forward against one at a time, in one run.

    PRUNEBENCH_DATA=../shared/data PYTHONPATH=. python scripts/bench_layerwise_ppl.py [--model smollm2-135m]

Scores the same windows layer-wise at each `--batches` value, the runs interleaved round by round so that
a change of the machine's load hits all alike, and prints each one's median seconds, its ratio to
batch 1 and whether its per-window NLLs are bit for bit those of batch 1 (they must be). On a GPU the
batch is what keeps the device busy; on a CPU the issue asks that it be no slower. Note `uptime`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench import data, models, tokenization
from bench.compose import compose
from bench.config import validate
from bench.core import perplexity


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cfg = validate(compose([f"model={args.model}", "data=wikitext2"]))
    model, tokenizer = models.load(cfg.model)
    model.eval()
    corpus = data.load_corpus("wikitext2", "test", cfg.data.dir, "eval", cfg.data.allow_fallback)
    windows = tokenization.eval_windows(tokenization.tokenize(tokenizer, corpus.text), args.seqlen, args.windows, "wikitext2")
    seconds = {batch: [] for batch in args.batches}
    nlls = {}
    for _ in range(args.repeats):
        for batch in args.batches:
            start = time.perf_counter()
            nlls[batch] = perplexity.layerwise_window_nlls(model, windows, args.device, batch=batch)
            seconds[batch].append(time.perf_counter() - start)
    base = statistics.median(seconds[args.batches[0]])
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.model}, "
          f"{windows.shape[0]} x {windows.shape[1]} {corpus.name} windows on {args.device}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} rounds")
    print(f"{'batch':>5} {'median s':>9} {'x batch ' + str(args.batches[0]):>10} {'same NLLs':>10}")
    for batch in args.batches:
        median = statistics.median(seconds[batch])
        same = torch.equal(nlls[batch], nlls[args.batches[0]])
        print(f"{batch:>5} {median:>9.2f} {median / base:>10.2f} {str(same):>10}")


if __name__ == "__main__":
    main()
