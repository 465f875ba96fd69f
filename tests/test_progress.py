"""Progress you can see: a cell's stages and their steps in progress.json, the sweep's live status
(counts, time left, stages and their progress, failures as they happen), a few lines per change and not
a flood."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from bench import models, progress
from bench.cell import run_cell
from bench.observer import CellObserver
from bench.core import families, perplexity, records
from reports.__main__ import main as reports_main
from reports.status import CellStatus, stage_of, watch
from tests.conftest import TINY


def cell(root: Path, name: str, status: str, total=None, error=None, stage=None, step=None):
    result = {"schema": 2, "status": status, "config_hash": name, "cell": {"model": "m", "method": name,
              "sparsity": 0.5}, "metrics": {}, "timings": {"total": total} if total else {},
              "process": {"host": socket.gethostname(), "pid": os.getpid()},
              "error": {"type": "OSError", "message": error, "traceback": ""} if error else None}
    records.write_json_atomic(root / name / records.RESULT_FILE, result)
    if stage:
        now = time.time()
        info = {"stage": stage, "stage_started": now - 12, "cell_started": now - 40}
        records.write_json_atomic(root / name / records.PROGRESS_FILE, {**info, "step": step} if step else info)


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
    assert "running method=wanda: prune (12s, cell 40s)" in text  # a progress.json without steps renders
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


def test_status_watch_waits_for_a_sweep_dir_made_after_it_started(tmp_path, capsys):
    # before: "not a directory", exit 2, for a watch started in the same breath as the sweep
    root = tmp_path / "later"
    watching = threading.Thread(target=reports_main, args=(["status", str(root), "--watch", "--interval", "0.05"],))
    watching.start()
    time.sleep(0.3)
    assert watching.is_alive() and not root.exists()
    records.write_manifest(root, [{"overrides": ["method=dense"], "config_hash": "dense"}])
    cell(root, "dense", "ok", total=3.0)
    watching.join(timeout=10)
    assert not watching.is_alive()
    out = capsys.readouterr().out
    assert out.startswith(f"reports: waiting for the sweep in {root} to start (it writes cells.json)\n")
    assert "1 cells: 1 done, 0 running, 0 failed, 0 waiting" in out


def test_a_cell_reports_its_stages_and_removes_its_progress_file(make_config, tmp_path, monkeypatch):
    seen = []
    write = progress.write_json_atomic

    def spy(path, payload):
        seen.append(payload["stages"][-1])
        assert json.loads((path.parent / records.RESULT_FILE).read_text())["status"] == "running"
        write(path, payload)

    monkeypatch.setattr(progress, "write_json_atomic", spy)
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", *TINY)
    assert run_cell(cfg, resolved, tmp_path).status == "ok"
    assert list(dict.fromkeys(seen)) == ["start", "load", "calib_data", "prune", "eval_ppl_pydoc"]
    assert not (tmp_path / records.PROGRESS_FILE).exists()


def test_progress_json_names_the_step_each_pass_just_finished(make_config, tmp_path, monkeypatch):
    """Read at every step boundary (from the cell observer's `step`), progress.json shows that step: block
    i/n of the pruning pass, then window i/n of the perplexity."""
    monkeypatch.setattr(progress, "STEP_INTERVAL", 0.0)  # every step written: the throttle is tested below
    seen = []
    on_step = CellObserver.step

    def spy(self, name, index, total, seconds):
        on_step(self, name, index, total, seconds)
        seen.append((name, index, total, json.loads((tmp_path / records.PROGRESS_FILE).read_text())))

    monkeypatch.setattr(CellObserver, "step", spy)
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", *TINY)
    assert run_cell(cfg, resolved, tmp_path).status == "ok"
    blocks, windows = cfg.model.architecture["num_hidden_layers"], 4
    assert [(name, index, total) for name, index, total, _ in seen] == \
        [("prune", i, blocks) for i in range(blocks)] + [("ppl", i, windows) for i in range(windows)]
    for name, index, total, info in seen:
        assert info["stage"] == ("prune" if name == "prune" else "eval_ppl_pydoc")
        assert info["step"] == {"pass": name, "unit": {"prune": "block", "ppl": "window"}[name],
                                "done": index + 1, "total": total}


def test_steps_are_written_at_most_once_a_second_but_a_new_pass_and_a_last_step_at_once(tmp_path, monkeypatch):
    clock, written = [100.0], []
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "write_json_atomic", lambda path, payload: written.append(payload.get("step")))
    cell_progress = progress.Progress(tmp_path)
    cell_progress.stage("prune")
    written.clear()
    for index in range(30):  # 30 blocks in 7.5 s
        cell_progress.step("prune", index, 30)
        clock[0] += 0.25
    cell_progress.step("search", 0, 8)  # 0.25 s after the last write, but a new pass
    cell_progress.finish()
    assert [(step["pass"], step["done"]) for step in written] == \
        [("prune", done) for done in (1, 5, 9, 13, 17, 21, 25, 29, 30)] + [("search", 1)]


def test_the_status_line_shows_the_pass_and_step_of_a_running_cell(tmp_path):
    def line(stage, step):
        cell(tmp_path, "c", "running", stage=stage, step=step)
        return stage_of(CellStatus([], "c", "running", "", str(tmp_path / "c" / records.RESULT_FILE)), time.time())

    dense = {"pass": "dense_statistics", "unit": "block", "done": 3, "total": 30}
    assert line("prune", dense) == "prune: dense statistics block 3/30 (12s, cell 40s)"
    search = {"pass": "search", "unit": "candidate", "done": 7, "total": 31}
    assert line("prune", search) == "prune: search candidate 7/31 (12s, cell 40s)"
    assert line("prune", {**dense, "pass": "prune"}) == "prune: block 3/30 (12s, cell 40s)"
    window = {"pass": "ppl", "unit": "window", "done": 5, "total": 16}
    assert line("eval_ppl_wikitext2", window) == "eval_ppl_wikitext2: ppl window 5/16 (12s, cell 40s)"


def test_watch_prints_a_running_pass_at_each_quarter_not_at_every_step(tmp_path):
    root, lines = sweep(tmp_path), []

    class Blocks:
        """Stands in for the stop event: each poll's wait is one more finished block of wanda's 30."""
        done = 1

        def wait(self, interval):
            self.done += 1
            if self.done > 30:
                return True
            cell(root, "wanda", "running", stage="prune",
                 step={"pass": "prune", "unit": "block", "done": self.done, "total": 30})
            return False

    cell(root, "wanda", "running", stage="prune", step={"pass": "prune", "unit": "block", "done": 1, "total": 30})
    watch(root, Blocks(), heartbeat=3600.0, out=lines.append)
    shown = [line.split("prune: ")[1].split(" (")[0] for text in lines for line in text.splitlines()
             if line.startswith("  running")]
    assert shown == ["block 1/30", "block 8/30", "block 15/30", "block 23/30", "block 30/30"]


@pytest.mark.parametrize("layerwise, name, unit", [(False, "ppl", "window"), (True, "ppl_layerwise", "block")])
def test_perplexity_reports_each_step_of_its_pass(make_config, layerwise, name, unit):
    cfg, _ = make_config("model=llama-tiny", *TINY)
    model, _ = models.load(cfg.model)
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    steps = []
    perplexity.perplexity(model, windows, "cpu", layerwise=layerwise,
                          on_step=lambda *step: steps.append(step[:3]))
    total = 3 if unit == "window" else len(families.arch_for(model).blocks(model))
    assert perplexity.PPL_STEPS[name] == unit and steps == [(name, i, total) for i in range(total)]


def test_the_console_callback_survives_submitit_pickling_the_launcher():
    import cloudpickle

    from reports.callback import SweepProgress

    watcher = SweepProgress(interval=2.0)
    watcher.thread = threading.Thread(target=lambda: None)
    copy = cloudpickle.loads(cloudpickle.dumps(watcher))  # before: cannot pickle '_thread.lock' object
    assert copy.interval == 2.0 and copy.thread is None and not copy.stop.is_set()
