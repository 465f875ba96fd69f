"""Resume state of a cell's pruning pass, so that an interrupted cell (Slurm preemption or time limit and
Submitit's requeue, a crash, Ctrl-C) goes on from its last saved block instead of from scratch.

Under `<cell dir>/resume/`:

    allocation.safetensors   what the pass took from the phase before it (`lifecycle.Allocation`: rates,
                             allocator record, block weights, the pruner's dense state), in bench.cache's
                             file format; written before block 0, so a search never runs twice
    block_<i>.safetensors    the state of pruned block i
    inputs_<k>.safetensors   the inputs of block k: the outputs of the pruned blocks before it
    state.json               the commit: its key, the next block k and its inputs file
    search.json              before the allocation: every candidate a search scored so far (its rounded
                             rates and fitness) under the key's digest; a requeued search replays its
                             choices and scores none of them again (91 candidates at 70B)

The blocks' keyword arguments (attention masks, rotary tables) are not saved: the engine captures them
again from the calibration samples, which no pruning changes (only the embeddings run for that).

Every file is written to a staging name and renamed, and state.json is written last, so a kill at any
moment leaves either the previous commit or the new one. Blocks are saved at most every
`resume_every_s` seconds (the blocks pruned since are written together at the next save), so a fast
cell pays little: what is lost on an interruption is at most that long plus one block.

The key is the cell's config hash, the code that prunes (engine, families, model loading, the calibration
sampler, every method module), the device, the calibration samples and the loaded checkpoint's files
(`model.path` rewritten in place: their sizes and modification times); state.json also holds the SHA-256
of every file it commits. A state written under another key, or whose files do not match their digests
(copied in from another cell, truncated, an edited `next_block`), is never resumed from: the cell starts
from scratch, says so in one warning line, and overwrites it. A cell that finishes removes the folder (`clear`).
Streamed cells (`model.stream`) are not resumable: they restart from scratch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pkgutil
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import methods
from bench import cache as caching
from bench.core import records
from methods.lifecycle import Allocation, ResumePoint

log = logging.getLogger(__name__)

FOLDER = "resume"
STATE_FILE = "state.json"
SEARCH_FILE = "search.json"
ALLOCATION_FILE = "allocation.safetensors"
# The harness modules whose code decides the pruned weights, besides every module of `methods`.
PRUNING_MODULES = ("bench.core.engine", "bench.core.families", "bench.models", "bench.llm", "bench.data")


def code_fingerprint() -> str:
    names = [module.name for module in pkgutil.walk_packages(methods.__path__, "methods.")]
    return caching.code_fingerprint([*PRUNING_MODULES, "methods", *names])


def clear(cell_dir: Path) -> None:
    """Remove a cell's resume state (the cell finished)."""
    shutil.rmtree(Path(cell_dir) / FOLDER, ignore_errors=True)


class ResumeState:
    """The resume store of one cell, given to `lifecycle.prune` as its `resume`."""

    def __init__(self, cell_dir: Path, config_hash: str, device: str, every_s: float, samples: str = "",
                 model_files: str = ""):
        self.root = Path(cell_dir) / FOLDER
        self.key = {"config_hash": config_hash, "code": code_fingerprint(), "device": device, "samples": samples,
                    "model_files": model_files}
        self.files: dict[str, str] = {}  # SHA-256 of every file the next commit covers
        self.digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:24]
        self.every_s = every_s
        self.pending: dict[int, nn.Module] = {}  # pruned blocks not saved yet
        self.last_save = time.monotonic()
        self.warnings: list[str] = []
        self.failed = False  # a save could not be written: no more are tried
        self.scores: dict[tuple, float] = {}  # a search's scored candidates (SEARCH_FILE)

    def load(self) -> Optional[ResumePoint]:
        """The saved point of this key, or None (nothing saved, or saved under another key)."""
        path = self.root / STATE_FILE
        if self.root.is_symlink():  # what it points to is not ours: neither read nor ever cleared
            self.failed = True
            message = f"resume state {self.root} is a symlink and is not used; the cell runs without resume state"
            log.warning(message)
            self.warnings.append(message)
            return None
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            if state["key"] != self.key:
                differ = ", ".join(k for k in self.key if state["key"].get(k) != self.key[k])
                raise ValueError(f"it was saved for another {differ}")
            missing = [i for i in range(state["next_block"]) if not self._block_path(i).exists()]
            if missing:
                raise FileNotFoundError(f"block files {missing} are missing")
            files = state.get("files")
            needed = {ALLOCATION_FILE, *(self._block_path(i).name for i in range(state["next_block"])),
                      *([state["inputs"]] if state["inputs"] is not None else [])}
            if not isinstance(files, dict) or set(files) != needed:
                raise ValueError(f"its file digests cover {sorted(files) if isinstance(files, dict) else files}, "
                                 f"not {sorted(needed)}")
            changed = [name for name in sorted(needed) if _sha256(self.root / name) != files[name]]
            if changed:
                raise ValueError(f"files {changed} do not match their digests")
            allocation = Allocation(**caching.read_entry(self.root / ALLOCATION_FILE, self.digest))
            inputs = None if state["inputs"] is None else load_file(self.root / state["inputs"])["inputs"]
        except Exception as exc:  # unreadable, foreign or stale: never trusted
            message = " ".join(f"resume state {self.root} not used ({exc}); the cell started from scratch".split())
            log.warning(message)
            self.warnings.append(message)
            return None
        self.files = dict(files)
        return ResumePoint(allocation=allocation, next_block=state["next_block"], inputs=inputs)

    def block(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self._block_path(index))

    def scored(self) -> dict[tuple, float]:
        """The candidates an interrupted search of this key scored (none when the file is another key's or
        unreadable: the search scores them again)."""
        path = self.root / SEARCH_FILE
        if self.root.is_symlink() or not path.exists():
            return {}
        try:
            saved = json.loads(path.read_text())
            if saved["digest"] != self.digest:
                return {}
            self.scores = {tuple(float(r) for r in rates): float(value) for rates, value in saved["scores"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.warnings.append(f"search state {path} not used ({exc}); the search scores its candidates again")
            return {}
        return dict(self.scores)

    def save_score(self, key: tuple, value: float) -> None:
        """One more scored candidate, written at once (a candidate costs minutes, the file milliseconds)."""
        if self.failed:
            return
        self.scores[key] = value
        self._guarded(self._save_scores)

    def _save_scores(self) -> None:
        if self.root.is_symlink():
            raise OSError(f"{self.root} is a symlink; nothing is written under it")
        self.root.mkdir(parents=True, exist_ok=True)
        records.write_atomic(self.root / SEARCH_FILE, json.dumps(
            {"digest": self.digest, "scores": [[list(rates), value] for rates, value in self.scores.items()]}))

    def save_allocation(self, allocation: Allocation) -> None:
        """A fresh pass starts: whatever was saved before goes, then the allocation and a commit at block 0."""
        self._guarded(self._save_allocation, allocation)

    def save_block(self, index: int, block: nn.Module, next_inputs: Optional[torch.Tensor]) -> None:
        """Block `index` is pruned; `next_inputs` feed block index + 1 (None after the last block)."""
        if self.failed:
            return
        self.pending[index] = block
        if time.monotonic() - self.last_save >= self.every_s:
            self._guarded(self._save_blocks, index, next_inputs)

    def _guarded(self, save, *args) -> None:
        """A save that cannot be written (full disk, quota) costs resumability, never the cell: the last
        commit stays valid (files of a half-done save are not in it) and no further save is tried."""
        try:
            save(*args)
        except OSError as exc:
            self.failed, self.pending = True, {}
            message = (f"resume state not saved under {self.root} ({exc}); the cell goes on, but an interruption "
                       f"from here on restarts it from its last saved block or from scratch")
            log.warning(message)
            self.warnings.append(message)

    def _save_allocation(self, allocation: Allocation) -> None:
        if self.root.is_symlink():
            raise OSError(f"{self.root} is a symlink; nothing under it is removed")
        (self.root / STATE_FILE).unlink(missing_ok=True)  # first: a kill while clearing leaves no commit
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        caching.write_entry(self.root / ALLOCATION_FILE, self.digest, vars(allocation))
        self.files = {ALLOCATION_FILE: _sha256(self.root / ALLOCATION_FILE)}
        self._commit(0, None)

    def _save_blocks(self, index: int, next_inputs: Optional[torch.Tensor]) -> None:
        for pending, module in self.pending.items():
            state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in module.state_dict().items()}
            _write(self._block_path(pending), state)
            self.files[self._block_path(pending).name] = _sha256(self._block_path(pending))
        self.pending = {}
        self.files = {name: digest for name, digest in self.files.items() if not name.startswith("inputs_")}
        inputs = None
        if next_inputs is not None:
            inputs = f"inputs_{index + 1}.safetensors"
            _write(self.root / inputs, {"inputs": next_inputs.contiguous()})
            self.files[inputs] = _sha256(self.root / inputs)
        self._commit(index + 1, inputs)

    def _commit(self, next_block: int, inputs: Optional[str]) -> None:
        state = {"key": self.key, "next_block": next_block, "inputs": inputs, "files": self.files,
                 "saved": time.time()}
        records.write_atomic(self.root / STATE_FILE, json.dumps(state))
        for stale in self.root.glob("inputs_*.safetensors"):
            if stale.name != inputs:
                stale.unlink()
        self.last_save = time.monotonic()

    def _block_path(self, index: int) -> Path:
        return self.root / f"block_{index}.safetensors"


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    records.write_atomic(path, lambda staging: save_file(tensors, str(staging)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def samples_digest(samples: torch.Tensor) -> str:
    """The calibration samples' identity in the key: the same config with another sampler or corpus file
    draws other samples, and blocks pruned on those must not be resumed."""
    return hashlib.sha256(samples.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:24]


def files_signature(path: Optional[str]) -> str:
    """The files of a local checkpoint (`model.path`) by name, size and modification time: one rewritten in
    place is another model. Reading every byte would cost minutes on a large checkpoint at every start."""
    if path is None:
        return ""
    root = Path(path).expanduser()
    entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]
