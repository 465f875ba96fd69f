"""Pruning models bigger than host memory: blocks streamed from safetensors shards, one at a time.

The model is built on the meta device (accelerate's `init_empty_weights`: parameters on meta, buffers
such as rotary frequencies real); the non-block parameters (embeddings, final norm, LM head) are read
from the shards; each decoder block is read when the engine reaches it (`BlockStream.load`) and, once
pruned, written to its own shard of a new checkpoint and put back on meta (`BlockStream.release`).
Peak host memory is the non-block parameters + one block + the calibration activations + the method's
per-block work (e.g. SparseGPT's Hessians), not the model. Perplexity of the pruned checkpoint is
computed the same way, block by block (`streamed_perplexity`), so the model is never whole in memory.
`Streamed` is this as the cell's model source (`bench.source`).

The output is a normal sharded checkpoint (`model.safetensors.index.json` + shards + config.json),
loadable by `AutoModelForCausalLM.from_pretrained`. Safetensors files are opened per block and closed
again, so mapped pages of other blocks never count against the process.

    python scripts/streaming_bench.py synthetic <dir> --layers 12 --hidden 2048 --ffn 5504   # random LLaMA shards
    python scripts/streaming_bench.py bench <dir> --out <dir>   # SparseGPT 50% streamed: peak RSS / checkpoint size
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Optional

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bench import checkpoint
from bench.cache import CellCache
from bench.config import ModelConfig, RunConfig
from bench.core import engine, perplexity
from bench.core.families import arch_for
from bench.core.records import Result
from bench.core.vocab import ConfigError
from bench.observer import CellObserver
from bench.source import ModelSource
from methods import lifecycle

INDEX_FILE = "model.safetensors.index.json"


def _weight_map(checkpoint: Path) -> dict[str, str]:
    index = checkpoint / INDEX_FILE
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = checkpoint / "model.safetensors"
    with safe_open(str(single), "pt") as handle:
        return {name: single.name for name in handle.keys()}


def _read(checkpoint: Path, weight_map: dict[str, str], names: list[str]) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(weight_map[name], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        with safe_open(str(checkpoint / file), "pt") as handle:
            for name in file_names:
                tensors[name] = handle.get_tensor(name)
    return tensors


def _set_tensor(module: nn.Module, name: str, device: str, value: Optional[torch.Tensor] = None) -> None:
    """accelerate's `set_module_tensor_to_device`. accelerate is imported here, not at the top: every cell
    imports this module (the pipeline picks its source), and only a streamed one needs it."""
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value)


def load_meta(checkpoint: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with its blocks on meta and everything else loaded from the checkpoint's shards."""
    from accelerate import init_empty_weights  # see _set_tensor

    checkpoint = Path(checkpoint)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    arch = arch_for(model)
    prefix = arch.blocks_path + "."
    weight_map = _weight_map(checkpoint)
    names = [name for name, _ in model.named_parameters() if not name.startswith(prefix) and name in weight_map]
    for name, tensor in _read(checkpoint, weight_map, names).items():
        _set_tensor(model, name, "cpu", tensor.to(dtype))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta and not name.startswith(prefix)]
    if missing:
        raise ValueError(f"{checkpoint}: no weights for {', '.join(missing)}")
    return model.eval()


class BlockStream:
    """The engine's block-loading hook: reads a block from `source`; writes edited blocks to `target`."""

    def __init__(self, model: nn.Module, source: Path, target: Path | None = None):
        self.model = model
        self.arch = arch_for(model)
        self.source = Path(source)
        self.weight_map = _weight_map(self.source)
        self.dtype = next(p for p in model.parameters() if not p.is_meta).dtype
        self.target = None if target is None else Path(target)
        self.written: dict[str, str] = {}  # tensor name -> shard file in target
        self.zeros = 0
        self.total = 0

    def _names(self, index: int, block: nn.Module) -> dict[str, str]:
        prefix = self.arch.block_name(index)
        return {name: f"{prefix}.{name}" for name, _ in block.named_parameters()}

    def load(self, index: int, block: nn.Module) -> None:
        names = self._names(index, block)
        tensors = _read(self.source, self.weight_map, list(names.values()))
        for local, full in names.items():
            _set_tensor(block, local, "cpu", tensors[full].to(self.dtype))

    def release(self, index: int, block: nn.Module, edited: bool) -> None:
        names = self._names(index, block)
        if edited and self.target is not None:
            file = f"block-{index:05d}.safetensors"
            save_file({full: block.get_parameter(local).detach().contiguous() for local, full in names.items()},
                      str(self.target / file), metadata={"format": "pt"})
            self.written.update({full: file for full in names.values()})
            for linear in self.arch.linears(block).values():
                self.zeros += int((linear.weight == 0).sum())
                self.total += linear.weight.numel()
        for local in names:
            _set_tensor(block, local, "meta")
        _return_freed_memory()

    def finish(self, model: nn.Module) -> Path:
        """Write the non-block parameters, the index and the config: `target` becomes a checkpoint."""
        prefix = self.arch.blocks_path + "."
        rest = {name: p.detach().contiguous() for name, p in model.named_parameters()
                if not name.startswith(prefix) and name in self.weight_map}
        save_file(rest, str(self.target / "rest.safetensors"), metadata={"format": "pt"})
        weight_map = {**self.written, **{name: "rest.safetensors" for name in rest}}
        size = sum((self.target / f).stat().st_size for f in set(weight_map.values()))
        (self.target / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size},
                                                          "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        model.config.save_pretrained(self.target)
        return self.target

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc raises its mmap threshold after big frees, so later
    block-sized tensors come from the heap and stay resident once freed: measured here, a streamed
    SparseGPT run then grows by about one block per block; with this it stays flat."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def prune_streamed(checkpoint: Path, target: Path, method, samples: torch.Tensor, sparsity: float,
                   device: str = "cpu", dtype: torch.dtype = torch.float32,
                   cache=None, on_step: engine.OnStep = None,
                   batch: int = 1) -> tuple[BlockStream, lifecycle.PruneReport]:
    """Prune the checkpoint in `checkpoint` block by block into a new sharded checkpoint in `target`
    (`on_step`, `batch`: see `lifecycle.prune`)."""
    if sparsity == 0:
        raise ValueError("sparsity=0: nothing to prune; use the checkpoint as it is")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = load_meta(checkpoint, dtype)
    stream = BlockStream(model, checkpoint, target)
    report = lifecycle.prune(model, method, samples, sparsity, device, cache=cache, stream=stream, on_step=on_step,
                             batch=batch)
    stream.finish(model)
    return stream, report


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(file.stat().st_size for file in Path(checkpoint).glob("*.safetensors"))


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def job_memory_bytes() -> int:
    """The memory this process may use: the RAM, capped by its cgroup's limit (and every ancestor's; Slurm's
    `--mem` is enforced this way, on the job's or the step's cgroup) and by Slurm's `SLURM_MEM_PER_NODE`.
    A job on a shared node is killed at its own limit, long before the node's RAM runs out."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit() and int(os.environ["SLURM_MEM_PER_NODE"]) > 0:
        limits.append(int(os.environ["SLURM_MEM_PER_NODE"]) * 2**20)  # megabytes
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one tree, memory.max ("max" = none)
            base, limit_file = CGROUP_ROOT, "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1: the memory controller's own tree
            base, limit_file = CGROUP_ROOT / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        for folder in (here, *here.parents):
            if not folder.is_relative_to(base):
                break
            try:
                value = (folder / limit_file).read_text().strip()
            except OSError:
                continue
            if value.isdigit():  # v1 writes "no limit" as a huge number, which the RAM caps anyway
                limits.append(int(value))
    return min(limits)


def host_memory_budget(configured_gb: Optional[float]) -> int:
    """Bytes a cell may use for the model in host memory: `model.host_memory_gb`, else half of what the
    job may use (`job_memory_bytes`)."""
    if configured_gb is not None:
        return int(configured_gb * 2**30)
    return job_memory_bytes() // 2


def should_stream(cfg: ModelConfig) -> bool:
    """`model.stream`: true, false, or auto (a local checkpoint larger than the host-memory budget)."""
    if cfg.stream == "auto":
        return cfg.path is not None and checkpoint_bytes(Path(cfg.path).expanduser()) > \
            host_memory_budget(cfg.host_memory_gb)
    return bool(cfg.stream)


def streamed_perplexity(checkpoint: Path, windows: torch.Tensor, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, on_step: engine.OnStep = None, batch: int = 1) -> float:
    """`bench.core.perplexity.perplexity` of a checkpoint, computed layer-wise with its blocks read from disk."""
    model = load_meta(checkpoint, dtype)
    return perplexity.perplexity(model, windows, device, stream=BlockStream(model, checkpoint), on_step=on_step,
                                 batch=batch)


class Streamed(ModelSource):
    """The cell's model never whole in memory: blocks are read from model.path's shards when the engine
    reaches them, pruned, written to the cell's save folder and dropped; perplexity is computed
    layer-wise from the written shards (of model.path, for the dense baseline, which prunes nothing).
    config.validate refuses what cannot stream for model.stream=true; model.stream=auto finds out here."""

    def __init__(self, cfg: RunConfig, result: Result, observer: CellObserver, save_to: Optional[Path]):
        super().__init__(cfg, result, observer, save_to)
        if save_to is None:
            raise ConfigError("model.stream=auto chose streaming (the checkpoint exceeds model.host_memory_gb) and "
                              "needs save_dir for the pruned checkpoint; set save_dir or model.stream=false")
        if cfg.recovery.enabled or cfg.eval.zeroshot is not None:
            raise ConfigError("model.stream=auto chose streaming (the checkpoint exceeds model.host_memory_gb), which "
                              "cannot run recovery or eval.zeroshot (both need the whole model); allowed: "
                              "recovery=none, eval=ppl, or model.stream=false")
        self.source = Path(cfg.model.path).expanduser()
        self.target = Path(save_to).expanduser()
        self.dtype = getattr(torch, cfg.model.dtype)
        self.evaluated = self.source  # the checkpoint perplexity reads: the pruned one once written
        result.warnings.append(f"streamed from {self.source} ({checkpoint_bytes(self.source) / 2**30:.2f} GiB)")

    def load(self):
        with self.observer.stage("load"):
            return transformers.AutoTokenizer.from_pretrained(self.source)

    def prune(self, method, samples: torch.Tensor, shared: CellCache) -> lifecycle.PruneReport:
        cfg = self.cfg
        if cfg.method.dense:  # the dense checkpoint is model.path itself: no stage, no sparsity record
            return lifecycle.PruneReport(rates={}, seconds={})
        if method.pruner.structured:
            raise ConfigError(f"model.stream=auto chose streaming (the checkpoint exceeds model.host_memory_gb), "
                              f"which cannot run method={cfg.method.name}: it changes FFN shapes; allowed: "
                              f"unstructured methods, or model.stream=false")
        self.observer.enter("prune")
        stream, report = prune_streamed(self.source, self.target, method, samples, cfg.sparsity, cfg.device,
                                        self.dtype, cache=shared, on_step=self.observer.step,
                                        batch=cfg.data.calib.batch)
        self.observer.timed(report.seconds)
        self.result.sparsity = {"target": cfg.sparsity, "measured": stream.sparsity, "allocated": report.rates}
        self.evaluated = self.target
        return report

    def save(self, tokenizer) -> None:
        """The pruned blocks are already written: the tokenizer and the recipe complete the checkpoint."""
        if self.evaluated == self.source:  # nothing pruned, nothing written
            return
        tokenizer.save_pretrained(self.target)
        checkpoint.write_recipe(self.target, self.result, self.result.config)
        self.result.saved_to = str(self.target.resolve())

    def perplexity(self, windows: torch.Tensor, desc: str, shared: CellCache) -> float:
        return streamed_perplexity(self.evaluated, windows, self.cfg.device, self.dtype, on_step=self.observer.step,
                                   batch=self.cfg.eval.ppl.batch)
