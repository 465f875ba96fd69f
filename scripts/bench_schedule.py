"""Benchmark: the loss-estimate scheduler's extra cost over uniform SparseGPT, in one process.

    PRUNEBENCH_DATA=../shared/data python scripts/bench_schedule.py --sparsity 0.7 --out runs/perf

Runs two full cells (uniform SparseGPT, then loss_estimate + SparseGPT) on the same model and data,
writing their result JSONs under --out (so `python -m reports collect` tables them), and prints the
pruning-time ratio. Both timings come from the same process on the same machine; on a shared CPU they
are still noisy, so read the ratio, not the seconds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from bench.cell import run_cell
from bench.compose import compose
from bench.config import validate
from bench.core.records import Result


def _cell(overrides: list[str], out: Path) -> Result:
    cfg = compose(overrides)
    result = run_cell(validate(cfg), OmegaConf.to_container(cfg, resolve=True), out)
    if not result.ok:
        raise RuntimeError(f"{overrides}: {result.error.message}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=Path("runs/perf_schedule"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both cells (e.g. model=opt-tiny)")
    args = parser.parse_args()
    seconds = {}
    for method in ("sparsegpt", "loss_estimate"):
        result = _cell([f"method={method}", f"sparsity={args.sparsity}", *args.overrides],
                       args.out / f"{method}_{args.sparsity}")
        t = result.timings
        seconds[method] = t.get("allocate_observe", 0) + t.get("allocate", 0) + t["prune"]
        print(f"{method}: prune {seconds[method]:.1f} s ({t.get('allocate_observe', 0):.1f} s dense statistics), "
              f"ppl {result.metrics.get('ppl')}")
    print(f"loss_estimate / uniform SparseGPT pruning time: {seconds['loss_estimate'] / seconds['sparsegpt']:.2f}x")


if __name__ == "__main__":
    main()
