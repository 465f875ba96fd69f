"""python -m reports status <sweep dir>: which cells of a sweep are done, running, failed or missing.

The sweep's cells are its cross product, listed in `cells.json` (written when the sweep starts). A cell's
result is found by its config hash, as on resume; a file that is not a readable result is listed as
such and left alone. A result still marked "running" whose process is gone (same host and dead
pid, or a Slurm job squeue no longer knows) was killed (OOM killer, node failure, hard timeout): it is
reported as failed, like an interrupted one.

`watch` is the live view of a sweep, the same under the local and Slurm launchers (started by
`reports.callback.SweepProgress`) and from any shell (`status <dir> --watch`): a few lines whenever a
cell changes state, stage or pass, passes another quarter of a pass, or every `heartbeat` seconds:
counts, elapsed and estimated time left, the running cells' stage and its progress (their
`progress.json`: `prune: block 12/30 (40s, cell 95s)`), and each failure's one-line reason as soon as
it fails.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench.core.records import CELLS_FILE, PROGRESS_FILE, CorruptResult, Result, read_manifest, read_results

STATES = ("done", "running", "failed", "missing")


@dataclass
class CellStatus:
    overrides: list[str]
    config_hash: str
    state: str  # one of STATES
    detail: str  # the error, or why a "running" result counts as failed
    path: Optional[str]
    seconds: Optional[float] = None  # a finished cell's total time


def sweep_cells(sweep_dir: Path) -> list[dict]:
    """[{overrides, config_hash}] for every cell of the sweep in `sweep_dir`."""
    manifest = read_manifest(sweep_dir)
    if manifest is None:
        raise FileNotFoundError(f"{sweep_dir} has no {CELLS_FILE}: not a sweep dir (prunebench writes it when "
                                f"a sweep starts)")
    return manifest


def status(sweep_dir: Path) -> tuple[list[CellStatus], list[tuple[str, str]]]:
    """The state of every cell, and the files under the sweep that are not readable results (an
    unreadable cells.json among them: then no cell is listed)."""
    found = read_results(sweep_dir)
    try:
        cells = sweep_cells(sweep_dir)
    except CorruptResult as exc:
        return [], [(str(Path(sweep_dir) / CELLS_FILE), str(exc))] + found.corrupt
    by_hash: dict[str, list[Result]] = {}
    for result in found.records:
        by_hash.setdefault(result.config_hash, []).append(result)
    queued = _queued_jobs(found.records)
    rows = []
    for cell in cells:
        ranked = sorted((_state(result, queued) + (result.path,) for result in by_hash.get(cell["config_hash"], [])),
                        key=lambda s: STATES.index(s[0]))
        state, detail, path = ranked[0] if ranked else ("missing", "", None)
        total = next((r.timings.get("total") for r in by_hash.get(cell["config_hash"], []) if r.path == path), None)
        rows.append(CellStatus(cell["overrides"], cell["config_hash"], state, detail, path, total))
    return rows, found.corrupt


def _state(result: Result, queued: Optional[set[str]]) -> tuple[str, str]:
    if result.ok:
        return "done", ""
    if result.status == "running":
        dead = _dead(result.process, queued)
        return ("failed", dead) if dead else ("running", "")
    error = result.error
    return "failed", f"{result.status}: {error.type if error else None}: {error.message if error else ''}".strip()


def _queued_jobs(results: list[Result]) -> Optional[set[str]]:
    """The Slurm jobs squeue still knows among those of the running cells elsewhere, from one query (a
    watch polls every few seconds, and one squeue per running cell loads slurmctld with a big sweep's
    hundreds); None where squeue cannot tell."""
    jobs = sorted({str(r.process["slurm_job_id"]) for r in results
                   if r.status == "running" and r.process.get("slurm_job_id") and not _local(r.process)})
    if not jobs or not shutil.which("squeue"):
        return None
    return _squeue(jobs)


def _squeue(jobs: list[str]) -> Optional[set[str]]:
    # %A: each array element's own id, the SLURM_JOB_ID its cell recorded (%i would print `<array>_<index>`)
    proc = subprocess.run(["squeue", "--noheader", "--format=%A", "--jobs", ",".join(jobs)], capture_output=True,
                          text=True)
    if proc.returncode == 0:
        return set(proc.stdout.split())
    if "invalid job id" not in proc.stderr.lower():
        return None  # slurmctld unreachable, a timeout: that tells nothing of the jobs
    if len(jobs) == 1:
        return set()  # the one job is gone from the controller
    # a job the controller purged makes squeue refuse the whole list: each alone says which are gone
    known = [_squeue([job]) for job in jobs]
    return None if None in known else set().union(*known)


def _local(process: dict) -> bool:
    return process.get("host") == socket.gethostname() and bool(process.get("pid"))


def _dead(process: dict, queued: Optional[set[str]] = None) -> str:
    """Why the process that wrote a "running" result is known to be gone, or "" if it may be alive;
    `queued`: the Slurm jobs squeue knows (`_queued_jobs`), None where it cannot tell."""
    if _local(process):
        try:
            os.kill(process["pid"], 0)
        except ProcessLookupError:
            return f"killed: pid {process['pid']} exited without writing a result"
        except PermissionError:
            pass
        # a pid is reused: a process that started after the cell did is another one, and the cell's is gone
        began, wrote = _start_time(process["pid"]), process.get("started")
        if began is not None and isinstance(wrote, (int, float)) and began > wrote + START_SLACK_S:
            return f"killed: pid {process['pid']} now belongs to a process started after the cell"
        return ""
    job = process.get("slurm_job_id")
    if job and queued is not None and str(job) not in queued:
        return f"killed: Slurm job {job} ended without writing a result"
    return ""


START_SLACK_S = 2.0  # /proc's start times are in clock ticks from a boot time in whole seconds


def _start_time(pid: int) -> Optional[float]:
    """When process `pid` started (Unix time), from Linux's /proc; None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def render(rows: list[CellStatus], corrupt: list[tuple[str, str]] = ()) -> str:
    counts = {state: sum(row.state == state for row in rows) for state in STATES}
    lines = [f"{len(rows)} cells: " + ", ".join(f"{counts[s]} {s}" for s in STATES), ""]
    for row in rows:
        line = f"{row.state:8s} {' '.join(row.overrides)}"
        if row.detail:
            line += f"  ({row.detail.splitlines()[0][:160]})"
        lines.append(line)
    lines += [f"corrupt  {path}  ({why}; left alone)" for path, why in corrupt]
    return "\n".join(lines)


def progress_of(row: CellStatus) -> Optional[dict]:
    """A running cell's progress.json (`bench.progress`), or None when it has none (yet)."""
    try:
        info = json.loads((Path(row.path).parent / PROGRESS_FILE).read_text())
    except (OSError, TypeError, ValueError, RecursionError):
        return None
    # a file of another shape (`[]`, a hand edit) is no progress, not a crash of the whole status
    numbers = (int, float)
    if not (isinstance(info, dict) and isinstance(info.get("stage"), str)
            and isinstance(info.get("stage_started"), numbers) and isinstance(info.get("cell_started"), numbers)):
        return None
    step = info.get("step")
    if step is not None and not (isinstance(step, dict) and isinstance(step.get("pass"), str)
                                 and isinstance(step.get("unit"), str) and isinstance(step.get("done"), int)
                                 and isinstance(step.get("total"), int) and step["total"] > 0):
        return None
    return info


def stage_of(row: CellStatus, now: float) -> str:
    """`prune: dense statistics block 3/30 (12s, cell 40s)` (the stage, the step its current pass
    finished last, the time in the stage and in the cell) from a running cell's progress.json, or ""
    when it has none yet."""
    info = progress_of(row)
    if info is None:
        return ""
    where = info["stage"]
    step = info.get("step")  # none until the stage's first step, and none in files from before steps
    if step:
        name = "" if step["pass"] == info["stage"] else step["pass"].replace("_", " ") + " "
        where += f": {name}{step['unit']} {step['done']}/{step['total']}"
    return f"{where} ({now - info['stage_started']:.0f}s, cell {now - info['cell_started']:.0f}s)"


def _milestone(row: CellStatus) -> tuple:
    """What `watch` prints a change of: the cell's state, its stage and pass, the quarter of the pass done."""
    info = progress_of(row) if row.state == "running" else None
    if info is None:
        return (row.state,)
    step = info.get("step")
    return (row.state, info["stage"]) + ((step["pass"], step["done"] * 4 // step["total"]) if step else ())


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summary(rows: list[CellStatus], elapsed: float, now: float, finished_here: int = 0) -> list[str]:
    """A few lines: counts, elapsed and estimated time left, and each running cell's stage (named by the
    overrides that differ between cells). Time left comes from the sweep's own pace (`elapsed` over the
    `finished_here` cells that ended while watching, process start-up and queueing included), else from
    the finished cells' run times."""
    counts = {state: sum(row.state == state for row in rows) for state in STATES}
    line = (f"[sweep {_clock(elapsed)}] {len(rows)} cells: {counts['done']} done, {counts['running']} running, "
            f"{counts['failed']} failed, {counts['missing']} waiting")
    durations = [row.seconds for row in rows if row.state == "done" and row.seconds]
    pace = elapsed / finished_here if finished_here else (sum(durations) / len(durations) if durations else None)
    if pace is not None and (counts["missing"] or counts["running"]):
        line += f"; about {_clock(pace * (counts['missing'] + 0.5 * counts['running']))} left"
    running = [f"  running {short_name(row, rows)}: {stage_of(row, now) or 'starting'}"
               for row in rows if row.state == "running"]
    return [line] + running


def short_name(row: CellStatus, rows: list[CellStatus]) -> str:
    """The cell's overrides that differ between the sweep's cells (`method=wanda seed=1`)."""
    common = set.intersection(*(set(other.overrides) for other in rows))
    return " ".join(o for o in row.overrides if o not in common) or " ".join(row.overrides)


def watch(sweep_dir: Path, stop: threading.Event, interval: float = 5.0, heartbeat: float = 60.0,
          out: Callable[[str], None] = print) -> list[CellStatus]:
    """Print the sweep's status whenever it changes (or every `heartbeat` s) until `stop` is set or every
    cell is done or failed; a failure's one-line reason is printed once, when it is first seen. Once `stop`
    is set it looks one last time, so the sweep's end state is the last thing shown."""
    started, last, last_time, reported, rows, ended_before = time.time(), None, 0.0, set(), [], None
    stopping = False
    while True:
        now = time.time()
        try:
            rows, _ = status(sweep_dir)
        except FileNotFoundError:  # cells.json not written yet
            rows = []
        for row in rows:
            if row.state == "failed" and row.config_hash not in reported:
                reported.add(row.config_hash)
                out(f"FAILED {short_name(row, rows)}: {(row.detail.splitlines() or [''])[0][:200]}")
        ended = sum(row.state in ("done", "failed") for row in rows)
        ended_before = ended if ended_before is None and rows else ended_before
        lines = summary(rows, now - started, now, ended - (ended_before or 0)) if rows else []
        state = [_milestone(row) for row in rows]
        if lines and (state != last or now - last_time >= heartbeat):
            out("\n".join(lines))
            last, last_time = state, now
        finished = rows and all(row.state in ("done", "failed") for row in rows)
        if finished or stopping:
            return rows
        stopping = stop.wait(interval)
