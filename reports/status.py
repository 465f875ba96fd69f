"""python -m reports status <sweep dir>: which cells of a sweep are done, running, failed or missing.

The sweep's cells are its cross product: `cells.json` (written by bench/sweep.py when the sweep starts),
else recomposed from the `multirun.yaml` Hydra writes in the sweep dir. A cell's result is found by its
config hash, as on resume. A result still marked "running" whose process is gone (same host and dead
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

from omegaconf import OmegaConf

from bench import sweep
from bench.results import read_results

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
    manifest = sweep.read_manifest(sweep_dir)
    if manifest is not None:
        return manifest
    multirun = Path(sweep_dir) / "multirun.yaml"
    if not multirun.exists():
        raise FileNotFoundError(f"{sweep_dir} has neither {sweep.CELLS_FILE} nor multirun.yaml: not a sweep dir")
    primary = OmegaConf.load(multirun)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=_config_dir(primary), version_base="1.3"):
        cells = sweep.expand(list(primary.hydra.overrides.task),
                             lambda overrides: compose(primary.hydra.job.config_name, overrides=overrides))
    return [{"overrides": cell.overrides, "config_hash": cell.config_hash} for cell in cells]


def _config_dir(primary) -> str:
    for source in primary.hydra.runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return source.path
    return str(Path(__file__).resolve().parent.parent / "conf")


def status(sweep_dir: Path) -> list[CellStatus]:
    by_hash: dict[str, list[dict]] = {}
    for result in read_results(sweep_dir):
        by_hash.setdefault(result.get("config_hash"), []).append(result)
    rows = []
    for cell in sweep_cells(sweep_dir):
        found = by_hash.get(cell["config_hash"], [])
        ranked = sorted((_state(result) + (result["path"],) for result in found), key=lambda s: STATES.index(s[0]))
        state, detail, path = ranked[0] if ranked else ("missing", "", None)
        rows.append(CellStatus(cell["overrides"], cell["config_hash"], state, detail, path))
    return rows


def _state(result: dict) -> tuple[str, str]:
    status = result.get("status")
    if status == "ok":
        return "done", ""
    if status == "running":
        dead = _dead(result.get("process") or {})
        return ("failed", dead) if dead else ("running", "")
    error = result.get("error") or {}
    return "failed", f"{status}: {error.get('type')}: {error.get('message', '')}".strip()


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


def render(rows: list[CellStatus]) -> str:
    counts = {state: sum(row.state == state for row in rows) for state in STATES}
    lines = [f"{len(rows)} cells: " + ", ".join(f"{counts[s]} {s}" for s in STATES), ""]
    for row in rows:
        line = f"{row.state:8s} {' '.join(row.overrides)}"
        if row.detail:
            line += f"  ({row.detail.splitlines()[0][:160]})"
        lines.append(line)
    return "\n".join(lines)
