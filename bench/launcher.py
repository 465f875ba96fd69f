"""Submitit launchers (`hydra/launcher=slurm`, `local`) that ask for each cell's own resources.

hydra-submitit-launcher submits a sweep as one job array with the launcher parameters of the sweep's
primary config, where a swept `model` group is still the default model, so every cell of a mixed-model
sweep would get one request. Here each cell's resource keys are resolved from its own config
(conf/hydra/launcher/*.yaml interpolate its `model.resources`; a value given on the command line wins
as usual), the cells are grouped by them, and each group becomes its own job array with its own
request: a sweep over a 125M and a 66B model is two arrays. Every array is submitted before any result
is awaited, so they queue side by side.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hydra._internal.callbacks import Callbacks
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra.experimental.callback import Callback
from hydra.types import HydraContext
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import submitit

log = logging.getLogger(__name__)

# Launcher keys that interpolate `model.resources.*`: what differs between the job arrays of a sweep.
RESOURCE_KEYS = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")


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
        loader = self.hydra_context.config_loader
        launchers = [loader.load_sweep_config(self.config, list(overrides)).hydra.launcher
                     for overrides in job_overrides]
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
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

    def __getstate__(self) -> dict:
        """What Submitit pickles into every cell's job: the launcher with the sweep's callbacks that hook a
        job (`on_job_start`/`on_job_end`, which Hydra calls in the cell's process) and none of the others.
        Ours act at the sweep's start and end, in the submitting process; unpickled in each cell, they
        would cost it the imports of their modules (the reports' pandas and matplotlib) for nothing."""
        state = dict(self.__dict__)
        context = self.hydra_context
        if context is not None:
            kept = Callbacks()
            kept.callbacks = [callback for callback in context.callbacks.callbacks if hooks_jobs(callback)]
            state["hydra_context"] = HydraContext(config_loader=context.config_loader, callbacks=kept)
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
    _EXECUTOR = "local"
