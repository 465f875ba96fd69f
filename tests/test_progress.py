"""Progress you can see: a cell's stages in progress.json, the sweep's live status (counts, time left,
stages, failures as they happen), a few lines per change and not a flood."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from bench import progress
from bench.cell import run_cell
from bench.core import records
from reports.__main__ import main as reports_main
from reports.status import watch
from tests.conftest import TINY


def cell(root: Path, name: str, status: str, total=None, error=None, stage=None):
    result = {"schema": 2, "status": status, "config_hash": name, "cell": {"model": "m", "method": name,
              "sparsity": 0.5}, "metrics": {}, "timings": {"total": total} if total else {},
              "process": {"host": socket.gethostname(), "pid": os.getpid()},
              "error": {"type": "OSError", "message": error, "traceback": ""} if error else None}
    records.write_json_atomic(root / name / records.RESULT_FILE, result)
    if stage:
        now = time.time()
        records.write_json_atomic(root / name / records.PROGRESS_FILE,
                                  {"stage": stage, "stage_started": now - 12, "cell_started": now - 40})


def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    names = ["dense", "wanda", "magnitude", "sparsegpt", "owl"]
    records.write_manifest(root, [{"overrides": [f"method={n}"], "config_hash": n} for n in names])
    cell(root, "dense", "ok", total=10.0)
    cell(root, "wanda", "running", stage="prune")
    cell(root, "magnitude", "failed", error="no weights\nsecond line")
    return root


def test_watch_prints_counts_eta_stages_and_each_failure_once(tmp_path):
    root, lines = sweep(tmp_path), []
    stop = threading.Event()
    stop.set()  # one poll
    watch(root, stop, out=lines.append)
    text = "\n".join(lines)
    # no cell ended while watching: the pace is the finished cells' run time, (2 + 0.5) x 10 s
    assert "5 cells: 1 done, 1 running, 1 failed, 2 waiting; about 0:00:25 left" in text
    assert "running method=wanda: prune (12s, cell 40s)" in text
    assert lines[0] == "FAILED method=magnitude: failed: OSError: no weights"  # one line, when seen
    lines.clear()
    watch(root, stop, out=lines.append)  # a new watcher reports it again; one watcher never twice (below)
    assert sum(line.startswith("FAILED") for line in lines) == 1


def test_watch_is_quiet_until_something_changes_and_ends_when_all_finished(tmp_path):
    root, lines = sweep(tmp_path), []
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(root, stop, 0.05, 3600.0, lines.append))
    thread.start()
    time.sleep(0.5)  # about ten polls, nothing changed
    assert len(lines) == 2  # the failure and one status block, not one per poll
    cell(root, "wanda", "ok", total=10.0)
    for name in ("sparsegpt", "owl"):
        cell(root, name, "ok", total=10.0)
    thread.join(timeout=10)
    assert not thread.is_alive()  # every cell done or failed: the watcher ends by itself
    assert lines[-1].endswith("5 cells: 4 done, 0 running, 1 failed, 0 waiting")
    assert not stop.is_set()


def test_time_left_follows_the_sweeps_own_pace():
    from reports.status import CellStatus, summary

    rows = [CellStatus([f"method={m}", "data=pydoc"], m, state, "", None, 2.0)
            for m, state in (("a", "done"), ("b", "running"), ("c", "missing"), ("d", "missing"))]
    lines = summary(rows, 60.0, 0.0, finished_here=2)
    # two cells ended in 60 s of watching (start-up included): 30 s each, though each ran 2 s
    assert lines[0].endswith("2 waiting; about 0:01:15 left")  # (2 + 0.5) x 30 s
    assert lines[1] == "  running method=b: starting"  # named by what differs, not every override


def test_status_watch_cli_on_a_finished_sweep(tmp_path, capsys):
    root = tmp_path / "done"
    records.write_manifest(root, [{"overrides": ["method=dense"], "config_hash": "dense"}])
    cell(root, "dense", "ok", total=3.0)
    assert reports_main(["status", str(root), "--watch", "--interval", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "1 cells: 1 done, 0 running, 0 failed, 0 waiting" in out and "done     method=dense" in out


def test_a_cell_reports_its_stages_and_removes_its_progress_file(make_config, tmp_path, monkeypatch):
    seen = []
    write = progress.write_json_atomic

    def spy(path, payload):
        seen.append(payload["stage"])
        assert json.loads((path.parent / records.RESULT_FILE).read_text())["status"] == "running"
        write(path, payload)

    monkeypatch.setattr(progress, "write_json_atomic", spy)
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", *TINY)
    assert run_cell(cfg, resolved, tmp_path).status == "ok"
    assert seen == ["start", "load", "calib_data", "prune", "eval_ppl_pydoc"]
    assert not (tmp_path / records.PROGRESS_FILE).exists()


def test_the_console_callback_survives_submitit_pickling_the_launcher():
    import cloudpickle

    from reports.callback import SweepProgress

    watcher = SweepProgress(interval=2.0)
    watcher.thread = threading.Thread(target=lambda: None)
    copy = cloudpickle.loads(cloudpickle.dumps(watcher))  # before: cannot pickle '_thread.lock' object
    assert copy.interval == 2.0 and copy.thread is None and not copy.stop.is_set()
