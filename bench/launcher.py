"""Submitit launchers (`hydra/launcher=slurm`, `local`) that ask for each cell's own resources.

hydra-submitit-launcher submits a sweep as one job array with the launcher parameters of the sweep's
primary config, where a swept `model` group is still the default model, so every cell of a mixed-model
sweep would get one request. Here each cell's resource keys are resolved from its own config
(conf/hydra/launcher/*.yaml interpolate its `model.resources`; a value given on the command line wins
as usual), the cells are grouped by them, and each group becomes its own job array with its own
request: a sweep over a 125M and a 66B model is two arrays. Every array is submitted before any result
is awaited, so they queue side by side.

The local launcher does not start Submitit's executor: that started two fresh interpreters per cell (its
controller and the job), and every job imported hydra, torch, transformers and the harness again (16-18 s a
cell on a loaded 2-core machine, where a fork costs milliseconds). Its cells' jobs are forked from one
multiprocessing fork server per sweep, which imports the harness once (`PRELOAD`); each job keeps what
Submitit's gave it (see `LocalLauncher`).
"""
from __future__ import annotations

import copy
import functools
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from hydra._internal.callbacks import Callbacks
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.experimental.callback import Callback
from hydra.types import HydraContext
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf, open_dict

from bench.isolate import die_with_parent

if TYPE_CHECKING:
    import submitit

log = logging.getLogger(__name__)

# Launcher keys that interpolate `model.resources.*`: what differs between the job arrays of a sweep.
RESOURCE_KEYS = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
# What the local launcher's fork server imports once, before it forks any cell's job: what a job
# imports (Hydra's job run, run.py's main, the harness, torch), and what transformers imports lazily for
# any model class (modeling_utils: 3 s of a 4.5 s job on the loaded machine; the auto classes and the
# decoder layers' base that every cell's validation imports: 0.05 s a job; a family's own module then
# takes 0.01 s).
PRELOAD = ["hydra.core.utils", "bench.cell", "bench.config", "bench.isolate", "bench.models", "bench.plan",
           "bench.sweep", "cloudpickle", "transformers.modeling_utils", "transformers.generation.utils",
           "transformers.models.auto.modeling_auto", "transformers.modeling_layers"]
LOCAL_MAX_NUM_TIMEOUT = 3  # Submitit's local executor's default: a timed-out cell runs again at most 3 times


def start_fork_server() -> None:
    """Start the fork server that every local job forks from, in the background (it imports `PRELOAD` in
    its own process); `run_jobs` connects to it when the first cell starts. Called before any thread of the
    sweep runs: for the moment of the server's start this process's stdout and stderr are /dev/null, which
    the server keeps. Each job writes to its own log files (`_job`); a server that inherited the sweep's
    console would keep a pipe reading it (`| tee`, a test's capture) open for the second its interpreter
    takes to exit after the sweep's, with torch and transformers loaded."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        multiprocessing.forkserver.ensure_running()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def resource_groups(launchers: Sequence[DictConfig]) -> dict[tuple, list[int]]:
    """The cells (indices into `launchers`, each cell's resolved `hydra.launcher` node) grouped by their
    resource keys: {((key, value), ...): [cell index, ...]}, groups in order of their first cell."""
    groups: dict[tuple, list[int]] = {}
    for index, launcher in enumerate(launchers):
        resources = tuple((key, launcher[key]) for key in RESOURCE_KEYS if key in launcher)
        groups.setdefault(resources, []).append(index)
    return groups


def hooks_jobs(callback: Callback) -> bool:
    """Whether a Hydra callback does anything around a single job."""
    kind = type(callback)
    return kind.on_job_start is not Callback.on_job_start or kind.on_job_end is not Callback.on_job_end


class _PerCellResources(submitit_launcher.BaseSubmititLauncher):
    """The launch of hydra-submitit-launcher (same executor, parameters, job numbers and job callable),
    with one `map_array` per resource group instead of one for the whole sweep."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        launchers = [config.hydra.launcher for config in self._cell_configs(job_overrides)]
        executor = self._executor()
        self._make_sweep_dir()
        submitted = {}
        for resources, indices in resource_groups(launchers).items():
            executor.update_parameters(**self._executor_keys(dict(resources)))
            log.info("job array of %d cell(s) with %s", len(indices),
                     " ".join(f"{key}={value}" for key, value in resources))
            calls = []
            for index in indices:
                number = initial_job_idx + index
                log.info(f"\t#{number} : {' '.join(filter_overrides(job_overrides[index]))}")
                calls.append((list(job_overrides[index]), "hydra.sweep.dir", number, f"job_id_for_{number}",
                              Singleton.get_state()))
            submitted.update(zip(indices, executor.map_array(self, *zip(*calls))))
        return [submitted[index].results()[0] for index in range(len(job_overrides))]

    def _cell_configs(self, job_overrides: Sequence[Sequence[str]]) -> list[DictConfig]:
        """Each cell's config, whose `hydra.launcher` is resolved from it (its model's resources)."""
        loader = self.hydra_context.config_loader
        return [loader.load_sweep_config(self.config, list(overrides)) for overrides in job_overrides]

    def _make_sweep_dir(self) -> None:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")

    def __getstate__(self) -> dict:
        """What Submitit pickles into every cell's job: the launcher with the sweep's callbacks that hook a
        job (`on_job_start`/`on_job_end`, which Hydra calls in the cell's process) and none of the others.
        Ours act at the sweep's start and end, in the submitting process; unpickled in each cell, they
        would cost it the imports of their modules (the reports' pandas and matplotlib) for nothing. The
        config loader goes without the sweep's composed cells (`bench.sweep._reuse_composed`): every job
        would carry all of them."""
        state = dict(self.__dict__)
        context = self.hydra_context
        if context is not None:
            kept = Callbacks()
            kept.callbacks = [callback for callback in context.callbacks.callbacks if hooks_jobs(callback)]
            loader = context.config_loader
            if "load_sweep_config" in getattr(loader, "__dict__", {}):
                loader = copy.copy(loader)
                del loader.load_sweep_config
            state["hydra_context"] = HydraContext(config_loader=loader, callbacks=kept)
        return state

    def _executor(self) -> submitit.AutoExecutor:
        # here, not at the top: Hydra imports every launcher plugin to list them, for --help and --cfg job
        # too, and submitit is most of this module's import time
        import submitit

        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        rest = {k: v for k, v in self.params.items() if k not in ("submitit_folder", "max_num_timeout")}
        executor.update_parameters(**self._executor_keys(rest))
        return executor

    def _executor_keys(self, params: dict[str, Any]) -> dict[str, Any]:
        """Launcher keys as Submitit's executor names them: shared ones as they are, the rest prefixed."""
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        return {key if key in shared else f"{self._EXECUTOR}_{key}": value for key, value in params.items()}


class SlurmLauncher(_PerCellResources):
    _EXECUTOR = "slurm"


class LocalLauncher(_PerCellResources):
    """Each cell's job is forked from the sweep's fork server (`run_jobs`), with what Submitit's local
    executor gave it: its own log (stdout and stderr under its `submitit_folder`, `%j` the job's pid,
    which is also `hydra.job.id`), its time limit (`timeout_min`: stopped, then run again from what it
    saved, at most `max_num_timeout` times), the first `gpus_per_node` GPUs (CUDA_VISIBLE_DEVICES), and
    every cell the sweeper hands over at once (one, unless `hydra.sweeper.max_batch_size` says more)."""

    _EXECUTOR = "local"

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle  # a job calls run.py's main, which plain pickle cannot name from another process

        configs = self._cell_configs(job_overrides)  # its launcher keys are read here; its job runs it as it is
        self._make_sweep_dir()
        jobs = []
        for index, (overrides, config) in enumerate(zip(job_overrides, configs)):
            number = initial_job_idx + index
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            call = functools.partial(self._run_job, config, number, Singleton.get_state())
            cell = config.hydra.launcher
            jobs.append(Job(f"#{number}", cloudpickle.dumps(call), str(cell.submitit_folder),
                            60.0 * cell.timeout_min, cell.gpus_per_node or 0, bool(cell.stderr_to_stdout)))
        returns = run_jobs(jobs, self.params.get("max_num_timeout", LOCAL_MAX_NUM_TIMEOUT))
        # a job that ended without a result left its cell's record saying so (or none): the sweep goes on,
        # and its end lists the cell among the failed ones
        return [JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED) if returned is None else returned
                for overrides, returned in zip(job_overrides, returns)]

    def _run_job(self, config: DictConfig, number: int, singleton_state: dict) -> JobReturn:
        """The cell's Hydra job, in its forked process: what Submitit's job ran (`BaseSubmititLauncher.__call__`),
        on the config the sweep's process composed for it."""
        Singleton.set_state(singleton_state)
        setup_globals()
        with open_dict(config.hydra.job):
            config.hydra.job.id = str(os.getpid())
            config.hydra.job.num = number
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


@dataclass
class Job:
    name: str  # for the log: "#3"
    payload: bytes  # a cloudpickled callable, called in the job's process; its return value comes back
    folder: str  # where the job's log goes; `%j` is its pid
    timeout_s: float
    gpus: int
    stderr_to_stdout: bool


def log_paths(folder: str, pid: int, stderr_to_stdout: bool = False) -> tuple[Path, Path]:
    """A job's stdout and stderr files, named as Submitit names them (`<id>_0_log.out`, `.err`)."""
    where = Path(folder.replace("%j", str(pid)))
    out = where / f"{pid}_0_log.out"
    return out, out if stderr_to_stdout else where / f"{pid}_0_log.err"


def run_jobs(jobs: Sequence[Job], max_num_timeout: int) -> list[Optional[Any]]:
    """Every job at once, each in a process forked from the fork server; what each returned, or None where
    its process ended without a result (killed, or out of time `max_num_timeout` + 1 times). An exception
    here (Ctrl-C, SIGTERM) stops every running job first: its `run_isolated` marks its cell interrupted."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # where the sweep's start did not start the server (read once)
    returns: list[Optional[Any]] = [None] * len(jobs)
    running: dict[int, tuple] = {}  # job index -> (process, its result pipe, deadline, times run)

    def start(index: int, runs: int) -> None:
        job = jobs[index]
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_job, name=f"cell {job.name}", args=(send, job))
        process.start()
        send.close()
        running[index] = (process, receive, time.monotonic() + job.timeout_s, runs + 1)

    try:
        for index in range(len(jobs)):
            start(index, 0)
        while running:
            nearest = min(deadline for _, _, deadline, _ in running.values())
            wait([receive for _, receive, _, _ in running.values()], timeout=max(0.0, nearest - time.monotonic()))
            for index, (process, receive, deadline, runs) in list(running.items()):
                if receive.poll():
                    returns[index] = _receive(receive)
                elif time.monotonic() < deadline:
                    continue
                else:
                    _stop([process])
                    log.error("cell %s ran out of time (hydra.launcher.timeout_min=%g)%s", jobs[index].name,
                              jobs[index].timeout_s / 60, "; running it again" if runs <= max_num_timeout else "")
                    del running[index]
                    if runs <= max_num_timeout:
                        start(index, runs)
                    continue
                process.join()
                del running[index]
                if returns[index] is None:
                    _, err = log_paths(jobs[index].folder, process.pid, jobs[index].stderr_to_stdout)
                    log.error("cell %s: its process ended without a result (exit code %s); its log: %s",
                              jobs[index].name, process.exitcode, err)
    except BaseException:
        _stop([process for process, *_ in running.values()])
        raise
    return returns


def _receive(receive) -> Optional[Any]:
    import cloudpickle

    try:
        return cloudpickle.loads(receive.recv_bytes())
    except EOFError:  # the process ended without sending
        return None


def _stop(processes: list) -> None:
    """SIGTERM (a job's `run_isolated` marks its cell interrupted and stops it), then SIGKILL after 10 s."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + 10
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.kill()
            process.join()


def _job(send, job: Job) -> None:
    """A cell's job, in a fork of the fork server: its output to its own log files, its GPUs, then the call."""
    import cloudpickle

    die_with_parent()  # the server's: it ends when the sweep process does
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in range(job.gpus))
    out, err = log_paths(job.folder, os.getpid(), job.stderr_to_stdout)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, stream in ((out, sys.stdout), (err, sys.stderr)):
        stream.flush()
        with open(path, "a") as log_file:
            os.dup2(log_file.fileno(), stream.fileno())
        stream.reconfigure(line_buffering=True)  # as Submitit's `python -u`: a log that is read while it grows
    returned = cloudpickle.loads(job.payload)()
    try:
        payload = cloudpickle.dumps(returned)
    except Exception:  # an exception of the job that does not pickle: its text
        failure = RuntimeError(repr(getattr(returned, "_return_value", returned)))
        payload = cloudpickle.dumps(JobReturn(status=JobStatus.FAILED, _return_value=failure))
    send.send_bytes(payload)
    send.close()
