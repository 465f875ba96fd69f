"""A real single-host Slurm cluster: a 4-cell sweep through `hydra/launcher=slurm`, then status + table.

The cluster is Debian's slurmctld + slurmd (installed with apt-get when missing) with a throwaway
config: auth/none (no munge), state, spool, logs and pid files under a temp dir, ports picked free,
SLURM_CONF pointing at it. Both daemons run in the foreground as children of this test and are the
only processes it stops. Without root or the packages the test is skipped with the reason, never passed.
"""
from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.cell import run_cell
from bench.core import records
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slurm

PACKAGES = ("slurmctld", "slurmd", "slurm-client")


def _skip(reason: str):
    print(f"test_slurm skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "sinfo")):
        return
    if os.geteuid() != 0:
        _skip("Slurm is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        _skip("Slurm is not installed and there is no apt-get to install it")
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        _skip(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-300:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_conf(state: Path) -> Path:
    host = socket.gethostname()
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    for sub in ("state", "spool"):
        (state / sub).mkdir()
    conf = state / "slurm.conf"
    conf.write_text(f"""\
ClusterName=prunebench
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
# also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=5
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}/state
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
# the backfill scheduler starts a requeued job (default every 30 s)
SchedulerParameters=bf_interval=5
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        _skip("slurmd must run as root here (no systemd, no slurm user)")
    _ensure_installed()
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(_write_conf(state))}
    daemons = []
    try:
        for argv in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", socket.gethostname()]):
            log = open(state / f"{argv[0]}.out", "w")
            daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while True:
            proc = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=env, capture_output=True, text=True)
            if proc.stdout.strip() in ("idle", "mix", "alloc"):
                break
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                logs = "".join((state / f).read_text()[-800:] for f in ("slurmctld.out", "slurmd.out"))
                pytest.fail(f"single-host Slurm did not come up (sinfo: {proc.stdout or proc.stderr!r}):\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        if daemons:
            _drain(env, state / "spool")
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _drain(env: dict, spool: Path) -> None:
    """Let this cluster's jobs and their slurmstepd finish (they outlive slurmd if it stops first)."""
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True).stdout
        if not queue.strip() and not any(path.is_socket() for path in spool.iterdir()):
            return
        time.sleep(0.5)


def test_sweep_on_real_slurm(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "run.py", "-m", "hydra/launcher=slurm", "cache=false", "model=llama-tiny",
               "method=magnitude,wanda", "sparsity=0.5,0.7", *TINY, f"hydra.sweep.dir={sweep_dir}"]
    env = {**slurm_cluster, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    submission = next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3" in submission and "#SBATCH --mem=4GB" in submission  # llama-tiny's preset

    status = subprocess.run([sys.executable, "-m", "reports", "status", str(sweep_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.stdout.startswith("4 cells: 4 done, 0 running, 0 failed, 0 missing"), status.stdout
    table = subprocess.run([sys.executable, "-m", "reports", "collect", str(sweep_dir)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    print(table.stdout)
    rows = list(csv.DictReader((sweep_dir / "table.csv").open()))  # long: one row per cell x metric
    cells = sorted((row["method"], float(row["sparsity"])) for row in rows if row["metric"] == "ppl/pydoc")
    assert cells == [("magnitude", 0.5), ("magnitude", 0.7), ("wanda", 0.5), ("wanda", 0.7)]
    for row in rows:  # every cell has a number: none missing, none failed
        assert row["status"] == "ok" and float(row["value"]) > 1, row


def test_each_model_of_a_sweep_gets_its_own_request(slurm_cluster, tmp_path):
    """Two models with different `resources` in one sweep: two job arrays, each asking for its own."""
    presets = tmp_path / "conf" / "model"
    presets.mkdir(parents=True)
    (presets / "llama-tiny-big.yaml").write_text(
        "defaults:\n  - llama-tiny\n  - _self_\nname: llama-tiny-big\nresources:\n  mem_gb: 5\n  cpus: 2\n")
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "run.py", "-m", "hydra/launcher=slurm", "cache=false",
               "model=llama-tiny,llama-tiny-big", "method=magnitude", *TINY, f"hydra.sweep.dir={sweep_dir}",
               f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    env = {**slurm_cluster, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    requests = set()
    for script in sweep_dir.glob(".submitit/*/*_submission.sh"):
        lines = script.read_text().splitlines()
        requests.add(tuple(line for line in lines if line.startswith(("#SBATCH --mem=", "#SBATCH --cpus-per-task="))))
    assert requests == {("#SBATCH --cpus-per-task=1", "#SBATCH --mem=4GB"),  # llama-tiny's preset
                        ("#SBATCH --cpus-per-task=2", "#SBATCH --mem=5GB")}
    status = subprocess.run([sys.executable, "-m", "reports", "status", str(sweep_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.stdout.startswith("2 cells: 2 done, 0 running, 0 failed, 0 missing"), status.stdout


def test_timed_out_cell_is_requeued_and_resumes(slurm_cluster, tmp_path, make_config):
    """A cell slower than its one-minute time limit gets Submitit's warning signal, is requeued, and
    resumes from its last saved block: the result says from which, and equals an uninterrupted run."""
    cell = ["model=llama-tiny", "model.architecture.num_hidden_layers=10", "method=sparsegpt", "sparsity=0.5",
            "cache=false", "resume_every_s=0", *TINY]
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "run.py", "-m", "hydra/launcher=slurm", *cell, f"save_dir={tmp_path / 'slurm'}",
               "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=1",
               "hydra.launcher.max_num_timeout=5", f"hydra.sweep.dir={sweep_dir}"]
    # Slurm checks time limits every 30 s and sends the signal at the first check less than 30 s before
    # it is due: with a 60 s limit and a 1 s delay, the first run gets 29 to 59 s. Its blocks slowed to
    # ~6.5 s make the cell longer than that, so it never finishes; the requeued run is not slowed and
    # finishes from the block the first one saved last (a run more would only wait on Slurm again).
    env = {**slurm_cluster, "PYTHONPATH": f"{ROOT / 'tests' / 'slow_blocks'}:{ROOT}",
           "PRUNEBENCH_TEST_BLOCK_DELAY_S": "3", "PRUNEBENCH_TEST_SLOW_FIRST_RUN_ONLY": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "".join(log.read_text() for log in sorted(sweep_dir.glob(".submitit/*/*_log.*")))
    result, = records.read_results(sweep_dir).records
    assert result.ok, logs[-3000:]
    assert "this job is timed-out" in logs and "Requeued job" in logs, logs[-3000:]
    print(f"{logs.count('Starting with JobEnvironment')} runs, the last resumed at block "
          f"{result.process['resumed_from_block']}")
    assert result.process["resumed_from_block"] >= 1
    assert not (Path(result.path).parent / "resume").exists()

    cfg, resolved = make_config(*cell, f"save_dir={tmp_path / 'whole'}")
    whole = run_cell(cfg, resolved, tmp_path / "whole_cell")
    assert result.metrics["ppl"] == whole.metrics["ppl"]
    expected, got = load_file(Path(whole.saved_to) / "model.safetensors"), \
        load_file(Path(result.saved_to) / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
