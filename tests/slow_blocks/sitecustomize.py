"""Put on PYTHONPATH by the Slurm resume test only (tests/test_slurm.py): every block forward of the
engine's traversals sleeps PRUNEBENCH_TEST_BLOCK_DELAY_S seconds first, so that a tiny cell outlives a
one-minute Slurm time limit. Python imports this module at start-up when it is on the path."""
import os
import time

from bench.core import engine

_run_block = engine.run_block


def _slow_run_block(*args, **kwargs):
    time.sleep(float(os.environ.get("PRUNEBENCH_TEST_BLOCK_DELAY_S", "0")))
    return _run_block(*args, **kwargs)


engine.run_block = _slow_run_block
