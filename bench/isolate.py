"""Per-cell process isolation: each cell runs in a forked child of the sweep's (or run.py's) process, so
that a cell the kernel kills (the out-of-memory killer) or a signal stops still leaves a result saying
so, and the sweep lives on to run its next cell. `run.py` runs every cell through `run_isolated`.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from bench.core import records
from bench.core.records import CellKey, CorruptResult, Failure, Result

_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def run_isolated(out_dir: Path, run: Callable[..., Result], *args: Any) -> Result:
    """`run(*args)` (a cell) in a forked child, so that a cell killed by the kernel (OOM killer) or by a
    signal still leaves a result saying so, and the sweep's own process lives on to run the next cell.

    Fork, not spawn: the parent has imported torch but run no op (no thread pool yet), and a fork costs
    milliseconds where a spawn re-imports everything.

    SIGTERM to this process (where nobody else handles it, e.g. Submitit) stops the child, marks the cell
    "interrupted" and exits 143; the child also gets SIGTERM when this process dies any other way
    (Linux), so no cell outlives its sweep."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, run, args))
    previous = _take_sigterm()
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the child died without sending its result
        result = None
    except BaseException as exc:  # Ctrl-C, SIGTERM, or Submitit's preemption/timeout handler in this process
        with _signals_held():
            child.terminate()
            child.join(10)
            child.kill()
            child.join()
            _mark(out_dir, "interrupted", type(exc).__name__, f"the sweep process was interrupted: {exc}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    child.join()
    if result is not None:
        return result
    code = child.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with {code}"
    return _mark(out_dir, "failed", "Killed", f"cell process {how} before writing its result "
                                              f"(SIGKILL is usually the out-of-memory killer)")


def _mark(out_dir: Path, status: str, error_type: str, message: str) -> Result:
    """Record in the cell's own result that its process ended without finishing it."""
    try:
        result = records.read_result(Path(out_dir) / records.RESULT_FILE)
    except CorruptResult:  # it died before writing anything readable: report, but write nothing
        return Result(status=status, config_hash="", cell=CellKey("", "", 0.0), error=Failure(error_type, message))
    if result.ok:  # a finished result (this cell's, or one it skipped to) is never overwritten
        return result
    result.status, result.error = status, Failure(error_type, message)
    records.write_result(out_dir, result)
    return result


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM ignored while an interrupted cell is stopped and marked: Ctrl-C reaches every process
    of the sweep's group, and the local launcher then stops its cells' jobs with SIGTERM; a second signal
    cut the marking short and left the cell "running"."""
    try:
        held = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handler of ours could have run here either
        held = {}
    try:
        yield
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)


class Terminated(SystemExit):
    """SIGTERM reached the sweep process while a cell ran: it exits 143 (128 + SIGTERM), as if killed."""

    def __str__(self) -> str:
        return "received SIGTERM"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def _take_sigterm():
    """Install the SIGTERM handler of `run_isolated` where SIGTERM has its default action (not under
    Submitit, which has its own, nor off the main thread); the previous handler, or None."""
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return None
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        return None


def die_with_parent() -> None:
    """SIGTERM to this process when its parent dies, even by SIGKILL (Linux), so no cell outlives its sweep."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child(send, run: Callable[..., Result], args: tuple) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Slurm sends Submitit's preemption/timeout signal (USR2, or USR1 where configured) to every process
    # of the job. The sweep process's handler requeues the job and then ends this child; the copy of that
    # handler the fork inherited would requeue it a second time.
    for preempt in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(preempt, signal.SIG_IGN)
    die_with_parent()
    send.send(run(*args))
    send.close()
