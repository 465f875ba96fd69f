"""Benchmark: a tiny sweep's wall time against the work its cells record, per launcher, in one run.

    PRUNEBENCH_DATA=../shared/data PYTHONPATH=. python scripts/bench_sweep.py --launchers basic local [--repeats 3]

Runs the same 8-cell sweep (llama-tiny, dense and wanda x 2 sparsities x 2 seeds, the tests' tiny data)
under each launcher, and one single cell with `run.py` (its process start and imports: the "one process
start" of the issue's goal), then prints per launcher: the sweep's wall time, the sum of its cells'
recorded `timings.total`, the fixed overhead per cell ((wall - sum - one start) / cells) and the ratio
wall / (sum + one start), which the issue wants at most 1.5. With `--repeats N` every run (the single cell
and each sweep) is taken N times, interleaved, and each number is the median. Timings on a shared machine
are noisy: read the ratios, and note `uptime` next to them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.core.records import read_manifest, read_results

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=llama-tiny", "data=pydoc", "eval.ppl.datasets=[pydoc]", "data.calib.nsamples=4",
        "data.calib.seqlen=64", "eval.ppl.seqlen=64", "eval.ppl.max_windows=4", "threads=1", "cache=false"]
GRID = ["method=dense,wanda", "sparsity=0.5,0.6", "seed=0,1"]


def _run(arguments: list[str], out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this checkout, whatever the cwd
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *arguments], cwd=out, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(arguments)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def _work(root: Path) -> float:
    """The cells' recorded seconds (a dense cell runs once for both sparsities: the other is skipped)."""
    return sum(result.timings["total"] for result in read_results(root).records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launchers", nargs="+", default=["basic", "local"], choices=["basic", "local"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    starts, singles, runs = [], [], {launcher: [] for launcher in args.launchers}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            out = Path(tmp) / str(repeat)
            out.mkdir()
            single_wall = _run([*TINY, "method=wanda", f"hydra.run.dir={out / 'single'}"], out)
            singles.append(single_wall)
            starts.append(single_wall - _work(out / "single"))  # the process start and imports of one run.py
            for launcher in args.launchers:
                sweep_dir = out / launcher
                wall = _run(["-m", f"hydra/launcher={launcher}", *TINY, *GRID, f"hydra.sweep.dir={sweep_dir}"], out)
                runs[launcher].append((len(read_manifest(sweep_dir)), wall, _work(sweep_dir)))
    start, single_wall = statistics.median(starts), statistics.median(singles)
    rows = []
    for launcher, taken in runs.items():
        cells = taken[0][0]
        wall, work = statistics.median(t[1] for t in taken), statistics.median(t[2] for t in taken)
        rows.append((launcher, cells, wall, work, (wall - work - start) / cells, wall / (work + start)))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"one run.py cell: {single_wall:.1f} s wall, {start:.1f} s of it start"
          f"{f' (medians of {args.repeats})' if args.repeats > 1 else ''}")
    print(f"{'launcher':<9} {'cells':>5} {'wall s':>7} {'work s':>7} {'overhead/cell s':>16} {'wall/(work+start)':>18}")
    for launcher, cells, wall, work, per_cell, ratio in rows:
        print(f"{launcher:<9} {cells:>5} {wall:>7.1f} {work:>7.1f} {per_cell:>16.1f} {ratio:>18.2f}")


if __name__ == "__main__":
    main()
