"""Benchmark: what the harness's cheap paths cost next to the packages under them, in one run.

    PYTHONPATH=. python scripts/bench_startup.py --repeats 5
    PYTHONPATH=. python scripts/bench_startup.py --run-py run_before.py    # another run.py (e.g. main's)

Times each command in a fresh interpreter, the commands interleaved round by round so that a change of
the machine's load hits all of them alike, and prints each one's median wall time and its ratio to
`python -c "import hydra, omegaconf"` (the floor of any Hydra app). The issue's goal: `run.py --help`
and `--cfg job` at most 2x that floor. On a shared machine read the ratios, not the seconds, and note
`uptime` next to them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "import hydra, omegaconf"


def commands(run_py: str) -> dict[str, list[str]]:
    return {
        FLOOR: ["-c", FLOOR],
        "import torch": ["-c", "import torch"],
        "run.py --help": [run_py, "--help"],
        "run.py --cfg job": [run_py, "--cfg", "job"],
        "import bench.sweep": ["-c", "import bench.sweep"],
        "import bench.cell": ["-c", "import bench.cell"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-py", default=str(ROOT / "run.py"), help="the entry script to time")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    todo = commands(args.run_py)
    seconds: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.repeats):
        for name, argv in todo.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            seconds[name].append(time.perf_counter() - start)
    floor = statistics.median(seconds[FLOOR])
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.repeats} rounds")
    print(f"{'command':<26} {'median s':>9} {'x floor':>8}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<26} {median:>9.2f} {median / floor:>8.1f}")


if __name__ == "__main__":
    main()
