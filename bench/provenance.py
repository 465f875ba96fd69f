"""What a result carries besides its numbers: the identity of a cell (its config hash), the versions,
commit and platform that produced it, and its peak memory. The record itself is `bench.core.records`.
"""
from __future__ import annotations

import hashlib
import json
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

# Keys that do not change the numbers a cell produces, so they stay out of its identity.
NON_IDENTITY_KEYS = ("save_dir", "save_format", "device", "targets", "logger", "rerun", "cache")
PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "lm-eval", "submitit", "wandb", "gguf")


def config_hash(resolved: dict) -> str:
    identity = {k: v for k, v in resolved.items() if k not in NON_IDENTITY_KEYS}
    canonical = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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
    }


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
