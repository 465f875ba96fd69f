"""Benchmark (run by hand): the plan's cost model (`bench/plan.py`) against what cells really use here.

    python scripts/plan_check.py table [--synthetic <dir>]   # predicted vs measured peak RSS and disk
    python scripts/plan_check.py capped <sharded ckpt> --limit-gb 1 --method wanda   # streamed under a cgroup limit

`table` runs each cell through run.py in its own process (nice'd, one at a time) and prints, per cell,
the plan's peak host RAM and disk (resume state + checkpoint) beside the measured peak RSS (the cell's
process tree, from wait4) and the peak bytes under the run dir and save_dir (polled), with their ratio.
The cells: SmolLM2-135M with SparseGPT, Wanda, CFSP and a small Self-Pruner search (GA operators) in
memory, Wanda and SparseGPT streamed from its checkpoint (saved by a dense cell first); with --gemma,
Gemma-3-270M's Wanda and SparseGPT in memory and streamed; with --synthetic (a checkpoint
`scripts/streaming_bench.py synthetic` wrote), Wanda and SparseGPT on it in memory and streamed.

`capped` runs a streamed cell (prune + layer-wise perplexity) inside a cgroup memory limit, as Slurm's
--mem sets one (root only; cgroup v1 or v2), then the same cell in memory without a limit, and prints the
limit, the checkpoint's size, both peaks and both perplexities. A cell that passes its limit is killed by
the kernel, so finishing is itself the proof that it stayed inside.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import plan, streaming  # noqa: E402
from bench.compose import compose  # noqa: E402
from bench.config import validate  # noqa: E402

GIB = 2**30
TOLERANCE = 0.2
# a small calibration and evaluation: the weights dominate what a cell holds, as at scale
QUICK = ["cache=false", "threads=1", "sparsity=0.5", "data=pydoc", "eval.ppl.datasets=[pydoc]",
         "data.calib.nsamples=16", "data.calib.seqlen=128", "eval.ppl.seqlen=128", "eval.ppl.max_windows=4"]
SEARCH = ["method=self_pruner_ga", "method.population=3", "method.generations=1"]


@dataclass
class Measured:
    returncode: int
    rss: int  # peak resident bytes of the cell's process tree
    cgroup_peak: Optional[int]  # the cgroup's own peak (page cache included), when run under a limit
    disk: int  # peak bytes under the run dir and save_dir
    result: dict
    seconds: float


def _bytes_under(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        for folder, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:  # renamed or removed while we looked
                    pass
    return total


class Cgroup:
    """A memory cgroup of its own with `limit` bytes (v1 memory controller, or v2), removed on exit."""

    def __init__(self, limit: int):
        name = f"prunebench-plan-check-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/memory")
        self.v1 = v1.is_dir()
        self.path = (v1 if self.v1 else Path("/sys/fs/cgroup")) / name
        self.path.mkdir()
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit))
        if not self.v1:
            (self.path / "memory.swap.max").write_text("0")

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> Optional[int]:
        file = self.path / ("memory.max_usage_in_bytes" if self.v1 else "memory.peak")
        return int(file.read_text()) if file.exists() else None

    def remove(self) -> None:
        self.path.rmdir()


def run_cell(overrides: list[str], out: Path, limit: Optional[int] = None) -> Measured:
    """One run.py cell in its own (nice'd) process, its peaks measured from outside."""
    run_dir = out / "run"
    save = [Path(o.split("=", 1)[1]) for o in overrides if o.startswith("save_dir=")]
    group = Cgroup(limit) if limit is not None else None
    command = ["nice", "-n", "5", sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}"]
    peak_disk, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            peak_disk[0] = max(peak_disk[0], _bytes_under([run_dir, *save]))

    watcher = threading.Thread(target=poll, daemon=True)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=group.enter if group else None)
        watcher.start()
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    peak_disk[0] = max(peak_disk[0], _bytes_under([run_dir, *save]))
    cgroup_peak = group.peak() if group else None
    if group:
        group.remove()
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return Measured(child.returncode, usage.ru_maxrss * 1024, cgroup_peak, peak_disk[0], result, seconds)


def predicted(overrides: list[str]) -> plan.Plan:
    return plan.plan_cell(validate(compose(overrides)), plan.grant(None))


def _ratio(measured: int, planned: int) -> str:
    return f"{measured / planned:.2f}" if planned else "-"


def _ppl(result: dict, decimals: int = 3) -> str:
    return ", ".join(f"{v:.{decimals}f}" for v in (result.get("metrics") or {}).get("ppl", {}).values()) or "-"


def _local_checkpoint(work: Path, model: str) -> Path:
    """A preset's model as a local safetensors checkpoint (what a streamed cell reads), saved by a dense cell."""
    target = work / f"{model}-dense"
    if not (target / "config.json").exists():
        log = _fresh(work / f"{model}-dense-cell")
        done = run_cell([*QUICK, f"model={model}", "method=dense", f"save_dir={target}"], log)
        if done.returncode != 0:
            raise SystemExit(f"the dense {model} cell failed: see {log / 'log.txt'}")
    return target


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def table_cells(work: Path, synthetic: Optional[Path], gemma: bool) -> list[tuple[str, list[str]]]:
    smol = ["model=smollm2-135m"]
    cells = [(f"smollm2 {name} in memory", [*smol, *args]) for name, args in
             (("sparsegpt", ["method=sparsegpt"]), ("wanda", ["method=wanda", "resume_every_s=0"]),
              ("cfsp", ["method=cfsp"]), ("self-pruner GA 3x1", SEARCH))]
    cells += [(f"smollm2 {m} streamed", [*smol, "model.stream=true", f"method={m}"]) for m in ("wanda", "sparsegpt")]
    if gemma:
        cells += [(f"gemma3-270m {m} {where}", ["model=gemma3-270m", f"model.stream={stream}", f"method={m}"])
                  for m in ("wanda", "sparsegpt") for where, stream in (("in memory", "false"), ("streamed", "true"))]
    if synthetic is not None:
        size = streaming.checkpoint_bytes(synthetic) / GIB
        for mode in ("false", "true"):
            for method in ("wanda", "sparsegpt"):
                cells.append((f"synthetic {size:.1f} GiB {method} {'streamed' if mode == 'true' else 'in memory'}",
                              ["model=llama-tiny", f"model.path={synthetic}", f"model.stream={mode}",
                               f"method={method}"]))
    return cells


def table(work: Path, synthetic: Optional[Path], gemma: bool, only: Optional[str]) -> bool:
    rows = ["| cell | placement | host GiB plan | peak RSS GiB | ratio | disk GiB plan | disk GiB peak | ratio | "
            "ppl | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    within = True
    for index, (label, args) in enumerate(table_cells(work, synthetic, gemma)):
        if only is not None and only not in label:
            continue
        if "model.stream=true" in args and not any(a.startswith("model.path=") for a in args):
            args = [*args, f"model.path={_local_checkpoint(work, args[0].split('=', 1)[1])}"]
        out = _fresh(work / f"cell{index}")
        overrides = [*QUICK, *args, f"save_dir={out / 'saved'}"]
        planned = predicted(overrides)
        done = run_cell(overrides, out)
        if done.returncode != 0:
            rows.append(f"| {label} | failed (exit {done.returncode}, see {out / 'log.txt'}) |")
            within = False
            continue
        disk_plan = planned.disk_resume + planned.disk_checkpoint
        for measured, planned_value in ((done.rss, planned.host_peak), (done.disk, disk_plan)):
            within &= abs(measured / planned_value - 1) <= TOLERANCE
        rows.append(f"| {label} | {planned.placement} | {planned.host_peak / GIB:.2f} | {done.rss / GIB:.2f} | "
                    f"{_ratio(done.rss, planned.host_peak)} | {disk_plan / GIB:.2f} | {done.disk / GIB:.2f} | "
                    f"{_ratio(done.disk, disk_plan)} | {_ppl(done.result)} | {done.seconds:.0f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))
    print(f"every measured peak within {TOLERANCE:.0%} of the plan: {'yes' if within else 'no'}")
    return within


def capped(checkpoint: Path, limit_gb: float, method: str, work: Path, windows: int) -> bool:
    limit = int(limit_gb * GIB)
    size = streaming.checkpoint_bytes(checkpoint)
    base = [*QUICK, "model=llama-tiny", f"model.path={checkpoint}", f"method={method}", "data.calib.nsamples=4",
            f"eval.ppl.max_windows={windows}", "eval.ppl.layerwise=true"]
    runs = {}
    for mode, cap in (("true", limit), ("false", None)):
        out = _fresh(work / f"stream-{mode}")
        overrides = [*base, f"model.stream={mode}", f"save_dir={out / 'saved'}"]
        runs[mode] = run_cell(overrides, out, cap), predicted(overrides)
        if runs[mode][0].returncode != 0:
            print(f"stream={mode} failed (exit {runs[mode][0].returncode}; -9 is the kernel's OOM kill): "
                  f"see {out / 'log.txt'}")
            return False
    (streamed, streamed_plan), (in_memory, in_memory_plan) = runs["true"], runs["false"]
    print(f"checkpoint {size / GIB:.2f} GiB; cgroup memory limit {limit / GIB:.2f} GiB "
          f"(checkpoint / limit = {size / limit:.1f}); {method} 50%, {windows} perplexity windows")
    cgroup_peak = (streamed.cgroup_peak or 0) / GIB
    print(f"streamed, under the limit: peak RSS {streamed.rss / GIB:.2f} GiB "
          f"(plan {streamed_plan.host_peak / GIB:.2f}), cgroup peak {cgroup_peak:.2f} GiB (page cache included), "
          f"{streamed.seconds:.0f} s, "
          f"ppl {_ppl(streamed.result, 6)}")
    print(f"in memory, no limit: peak RSS {in_memory.rss / GIB:.2f} GiB (plan {in_memory_plan.host_peak / GIB:.2f}), "
          f"{in_memory.seconds:.0f} s, ppl {_ppl(in_memory.result, 6)}")
    same = _ppl(streamed.result, 6) == _ppl(in_memory.result, 6)
    print(f"same perplexity (6 decimals): {'yes' if same else 'no'}")
    return same and streamed.rss <= limit


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/plan_check.py")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("table", help="predicted vs measured peak RSS and disk")
    check.add_argument("--synthetic", type=Path, help="a sharded checkpoint from streaming_bench.py synthetic")
    check.add_argument("--gemma", action="store_true", help="Gemma-3-270M rows too (its first load downloads)")
    check.add_argument("--only", help="only the cells whose label contains this")
    check.add_argument("--work", type=Path, help="where the cells run (default: a temporary dir)")
    cap = commands.add_parser("capped", help="a streamed cell inside a cgroup memory limit vs in memory")
    cap.add_argument("checkpoint", type=Path)
    cap.add_argument("--limit-gb", type=float, required=True)
    cap.add_argument("--method", default="wanda")
    cap.add_argument("--windows", type=int, default=4)
    cap.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="plan-check-") as scratch:
        work = _fresh(args.work or Path(scratch))
        ok = table(work, args.synthetic, args.gemma, args.only) if args.command == "table" else \
            capped(args.checkpoint, args.limit_gb, args.method, work, args.windows)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
