"""Put on PYTHONPATH by the tests that need a cell still running when something happens to it (the Slurm
time limit in tests/test_slurm.py, Ctrl-C in tests/test_local_launcher.py): every block forward of the
engine's traversals sleeps PRUNEBENCH_TEST_BLOCK_DELAY_S seconds first. Python imports this module at
start-up when it is on the path."""
import os
import time

from bench.core import engine

_run_block = engine.run_block


def _slow_run_block(*args, **kwargs):
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0  # set by Slurm in a requeued job's runs
    if not (requeued and os.environ.get("PRUNEBENCH_TEST_SLOW_FIRST_RUN_ONLY")):
        time.sleep(float(os.environ.get("PRUNEBENCH_TEST_BLOCK_DELAY_S", "0")))
    return _run_block(*args, **kwargs)


engine.run_block = _slow_run_block
