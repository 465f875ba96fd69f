"""What a result carries besides its numbers: the versions, commit, platform and hardware that produced
it, and its peak memory. The record itself is `bench.core.records`, a cell's identity (its config hash)
`bench.core.identity`.

Numbers are bit-identical between runs only with the same numerics: MKL's kernel path (MKL_CBWR, pinned
in `bench/__init__.py`) and the thread count (LAPACK's Cholesky inverse in SparseGPT and torch's full
reductions split their work per thread, so 1, 2 and 4 threads give different last bits). `fix_numerics`
sets the cell's thread count from the config (`threads`), so a forked child, a Submitit child and a
Slurm job on a bigger node all compute alike; `hardware()` records what the numbers came from.
"""
from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "lm-eval", "submitit", "wandb", "gguf")


def provenance() -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git": _git_state(),
        "argv": sys.argv,
        "hardware": hardware(),
    }


def fix_numerics(threads: int) -> None:
    """The cell's thread count, whatever the process inherited (a fork keeps the parent's pool size, a
    Submitit child starts with one per core)."""
    torch.set_num_threads(threads)


def hardware() -> dict:
    """CPU model, BLAS/LAPACK and MKL kernel path, torch threads and GPU: what the last bits depend on."""
    config = torch.__config__.show()

    def build(key: str):
        found = re.search(rf"{key}=([^,\s]+)", config)
        return found.group(1) if found else None

    mkl = re.search(r"Math Kernel Library Version (\S+)", config)
    return {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "blas": build("BLAS_INFO"),
        "lapack": build("LAPACK_INFO"),
        "mkl": mkl.group(1) if mkl else None,
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty)}


def peak_memory() -> dict:
    memory = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
