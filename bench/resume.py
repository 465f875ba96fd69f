"""Resume state of a cell's pruning pass, so that an interrupted cell (Slurm preemption or time limit and
Submitit's requeue, a crash, Ctrl-C) goes on from its last saved block instead of from scratch.

Under `<cell dir>/resume/`:

    allocation.safetensors   what the pass took from the phase before it (`lifecycle.Allocation`: rates,
                             allocator record, block weights, the pruner's dense state), in bench.cache's
                             file format; written before block 0, so a search never runs twice
    block_<i>.safetensors    what pruning changed in block i against its dense weights, which a resumed cell
                             loads anyway (`encode`): nothing for a tensor it left alone, the mask of its
                             nonzeros when the kept weights are the dense ones (Wanda, magnitude: 1 bit per
                             weight), the mask and the kept values when they changed too (SparseGPT's update),
                             the whole tensor when its shape changed (structured pruning); a 70B Wanda pass
                             keeps about 8 GiB here instead of the pruned model's 128
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

import numpy as np
import torch
from safetensors import safe_open
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
# The harness modules whose code decides the pruned weights, besides every module of `methods`, and this one
# (the format its blocks are read back in).
PRUNING_MODULES = ("bench.resume", "bench.core.engine", "bench.core.families", "bench.models", "bench.llm",
                   "bench.data")


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
        self.pending: dict[int, tuple[nn.Module, dict]] = {}  # pruned blocks not saved yet, with `encode_masks`'s
        self.dense: Optional[tuple[int, dict[str, torch.Tensor]]] = None  # the block being pruned, as it was
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

    def block(self, index: int, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state of pruned block `index`, from its saved changes and `dense`, the block's state as loaded."""
        with safe_open(self._block_path(index), "pt") as handle:
            encoded = {name: handle.get_tensor(name) for name in handle.keys()}
            same = json.loads((handle.metadata() or {}).get("same", "[]"))
        return decode(encoded, same, dense)

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

    def dense_block(self, index: int, block: nn.Module) -> None:
        """Block `index` is about to be pruned: its dense state is what its saved changes are taken against."""
        if not self.failed:
            self.dense = (index, {name: tensor.detach().to("cpu", copy=True)
                                  for name, tensor in block.state_dict().items()})

    def save_block(self, index: int, block: nn.Module, next_inputs: Optional[torch.Tensor]) -> None:
        """Block `index` is pruned; `next_inputs` feed block index + 1 (None after the last block)."""
        if self.failed:
            return
        dense = self.dense[1] if self.dense is not None and self.dense[0] == index else {}
        self.dense = None
        # the masks are taken now, so that one dense block is held, not every pending one
        self.pending[index] = (block, encode_masks(block.state_dict(), dense))
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
        for pending, (module, masks) in self.pending.items():
            encoded, same = encode(module.state_dict(), masks)
            _write(self._block_path(pending), encoded, {"same": json.dumps(same)})
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


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    records.write_atomic(path, lambda staging: save_file(tensors, str(staging), metadata=metadata))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers: -0.0 and NaN compare by their bits, so decoding is exact."""
    return tensor.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def encode_masks(state: dict[str, torch.Tensor], dense: dict[str, torch.Tensor]) -> dict[str, object]:
    """Per tensor of a pruned block's `state`: "same" (unchanged from `dense`), the packed mask of its
    nonzeros when every kept value is the dense one, "values" when kept values changed too, "whole" when
    it has no dense counterpart of its shape."""
    kinds: dict[str, object] = {}
    for name, tensor in state.items():
        base = dense.get(name)
        if base is None or base.shape != tensor.shape or base.dtype != tensor.dtype:
            kinds[name] = "whole"  # reshaped or added by pruning (structured, FLAP's bias)
            continue
        bits, base_bits = _bits(tensor.detach().cpu()), _bits(base)
        if torch.equal(bits, base_bits):
            kinds[name] = "same"
        elif torch.equal(bits, torch.where(bits != 0, base_bits, 0)):
            kinds[name] = torch.from_numpy(np.packbits((bits != 0).numpy().ravel()))
        else:
            kinds[name] = "values"
    return kinds


def encode(state: dict[str, torch.Tensor], kinds: dict[str, object]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a block's file (`<name>::mask`, `<name>::values` or `<name>` whole) and the names
    left as they were: the values of a changed tensor go with its mask when that is smaller than the tensor."""
    encoded, same = {}, []
    for name, tensor in state.items():
        kind, tensor = kinds.get(name, "whole"), tensor.detach().cpu().contiguous()
        if isinstance(kind, torch.Tensor):
            encoded[f"{name}::mask"] = kind
        elif kind == "same":
            same.append(name)
        else:
            keep = _bits(tensor) != 0
            values = tensor[keep]
            if kind == "values" and values.nbytes + tensor.numel() / 8 < tensor.nbytes:  # sparse enough
                encoded[f"{name}::mask"] = torch.from_numpy(np.packbits(keep.numpy().ravel()))
                encoded[f"{name}::values"] = values
            else:
                encoded[name] = tensor.clone()
    return encoded, same


def decode(encoded: dict[str, torch.Tensor], same: list[str],
           dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The block's state from its file's tensors (`encode`) and its dense state."""
    state = {name: dense[name] for name in same}
    for key, tensor in encoded.items():
        name, _, part = key.partition("::")
        if not part:
            state[name] = tensor
        elif part == "mask":
            base = dense[name]
            keep = torch.from_numpy(np.unpackbits(tensor.numpy(), count=base.numel()).astype(bool)).view(base.shape)
            values = encoded.get(f"{name}::values")
            if values is None:
                state[name] = torch.where(keep, _bits(base), 0).view(base.dtype)
            else:
                state[name] = torch.zeros_like(base)
                state[name][keep] = values
    return state


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
