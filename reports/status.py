"""python -m reports status <sweep dir>: which cells of a sweep are done, running, failed or missing.

The sweep's cells are its cross product, listed in `cells.json` (written when the sweep starts). A cell's
result is found by its config hash, as on resume; a file that is not a readable result is listed as
such and left alone. A result still marked "running" whose process is gone (same host and dead
pid, or a Slurm job squeue no longer knows) was killed (OOM killer, node failure, hard timeout): it is
reported as failed, like an interrupted one.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.core.records import CELLS_FILE, CorruptResult, Result, read_manifest, read_results

STATES = ("done", "running", "failed", "missing")


@dataclass
class CellStatus:
    overrides: list[str]
    config_hash: str
    state: str  # one of STATES
    detail: str  # the error, or why a "running" result counts as failed
    path: Optional[str]


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
    rows = []
    for cell in cells:
        ranked = sorted((_state(result) + (result.path,) for result in by_hash.get(cell["config_hash"], [])),
                        key=lambda s: STATES.index(s[0]))
        state, detail, path = ranked[0] if ranked else ("missing", "", None)
        rows.append(CellStatus(cell["overrides"], cell["config_hash"], state, detail, path))
    return rows, found.corrupt


def _state(result: Result) -> tuple[str, str]:
    if result.ok:
        return "done", ""
    if result.status == "running":
        dead = _dead(result.process)
        return ("failed", dead) if dead else ("running", "")
    error = result.error
    return "failed", f"{result.status}: {error.type if error else None}: {error.message if error else ''}".strip()


def _dead(process: dict) -> str:
    """Why the process that wrote a "running" result is known to be gone, or "" if it may be alive."""
    if process.get("host") == socket.gethostname() and process.get("pid"):
        try:
            os.kill(process["pid"], 0)
        except ProcessLookupError:
            return f"killed: pid {process['pid']} exited without writing a result"
        except PermissionError:
            pass
        return ""
    job = process.get("slurm_job_id")
    if job and shutil.which("squeue"):
        proc = subprocess.run(["squeue", "--noheader", "--jobs", job], capture_output=True, text=True)
        if not proc.stdout.strip():
            return f"killed: Slurm job {job} ended without writing a result"
    return ""


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
