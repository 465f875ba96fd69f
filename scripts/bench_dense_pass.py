"""Benchmark: what a sweep over sparsities of a method with a dense pass pays for it, with and without
the cross-cell cache, in one run.

    PRUNEBENCH_DATA=../shared/data PYTHONPATH=. python scripts/bench_dense_pass.py [--method owl_wanda]

Runs the same sweep (one model, the method at 4 sparsities, one seed, in-process launcher) twice into
a fresh cache dir: `cache=false`, then `cache=true`. Per sweep it prints each cell's recorded
`allocate_observe` (the dense pass, or its cache read), `allocate` and `prune` seconds, and the ratio of
the sweep's sum of the three to one dense pass (the first cell's with the cache on, a miss) plus the 4
pruning passes: the
issue wants at most 1.5 with the cache; without it the dense pass is paid in every cell. Read the
ratios, not the seconds, and note `uptime` next to them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.core.records import read_results

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data=wikitext2", "eval.ppl.datasets=[wikitext2]", "data.calib.nsamples=8", "data.calib.seqlen=128",
         "eval.ppl.seqlen=128", "eval.ppl.max_windows=2", "threads=1"]


def sweep(arguments: list[str], out: Path, cache_root: Path) -> list:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PRUNEBENCH_CACHE": str(cache_root)}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=basic", *arguments,
                           f"hydra.sweep.dir={out}"], cwd=out.parent, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run.py -m {' '.join(arguments)} failed:\n{proc.stderr[-3000:]}")
    results = [r for r in read_results(out).records if r.ok]
    return sorted(results, key=lambda r: r.process["started"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="owl_wanda", help="a method with a dense pass: owl_*, loss_estimate*, "
                                                             "cfsp")
    parser.add_argument("--sparsities", default="0.4,0.5,0.6,0.7")
    args = parser.parse_args(argv)
    grid = [f"model={args.model}", f"method={args.method}", f"sparsity={args.sparsities}", *SMALL]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the model's conversion and the corpora's tokens are cached before, so both sweeps differ only in
        # the dense pass
        sweep([f"model={args.model}", "method=magnitude", "sparsity=0.5", *SMALL, "cache=true"], tmp / "warm",
              models_cache := tmp / "cache")
        for cache in ("false", "true"):
            rows[cache] = sweep([*grid, f"cache={cache}"], tmp / f"cache_{cache}", models_cache)
    dense = rows["true"][0].timings["allocate_observe"]
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.model}, {args.method}")
    print(f"{'cache':<6} {'sparsity':>8} {'dense pass s':>13} {'allocate s':>11} {'prune s':>8}  dense state")
    for cache, results in rows.items():
        for result in results:
            print(f"{cache:<6} {result.cell.sparsity:>8} {result.timings['allocate_observe']:>13.2f} "
                  f"{result.timings['allocate']:>11.2f} {result.timings['prune']:>8.2f}  "
                  f"{'cache hit' if 'dense_state' in result.cache.get('hits', []) else 'computed'}")
    for cache, results in rows.items():
        spent = sum(r.timings[stage] for r in results for stage in ("allocate_observe", "allocate", "prune"))
        floor = dense + sum(r.timings["prune"] for r in results)
        print(f"cache={cache}: allocate + prune of {len(results)} cells {spent:.1f} s = {spent / floor:.2f} x "
              f"(one dense pass {dense:.1f} s + their pruning passes)")


if __name__ == "__main__":
    main()
