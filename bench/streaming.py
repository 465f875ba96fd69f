"""Pruning models bigger than host memory: blocks streamed from safetensors shards, one at a time.

The model is built on the meta device (accelerate's `init_empty_weights`: parameters on meta, buffers
such as rotary frequencies real); the non-block parameters (embeddings, final norm, LM head) are read
from the shards; each decoder block is read when the engine reaches it (`BlockStream.load`) and, once
pruned, written to its own shard of a new checkpoint and put back on meta (`BlockStream.release`).
Peak host memory is the non-block parameters + one block + the calibration activations + the method's
per-block work (e.g. SparseGPT's Hessians), not the model. Perplexity of the pruned checkpoint is
computed the same way, block by block (`streamed_perplexity`), so the model is never whole in memory.

The output is a normal sharded checkpoint (`model.safetensors.index.json` + shards + config.json),
loadable by `AutoModelForCausalLM.from_pretrained`. Safetensors files are opened per block and closed
again, so mapped pages of other blocks never count against the process.

    python -m bench.streaming synthetic <dir> --layers 12 --hidden 2048 --ffn 5504   # random LLaMA shards
    python -m bench.streaming bench <dir>     # SparseGPT 50% streamed: peak RSS / checkpoint size
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bench import engine
from bench.arch import arch_for

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


def load_meta(checkpoint: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with its blocks on meta and everything else loaded from the checkpoint's shards."""
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
        set_module_tensor_to_device(model, name, "cpu", value=tensor.to(dtype))
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
            set_module_tensor_to_device(block, local, "cpu", value=tensors[full].to(self.dtype))

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
            set_module_tensor_to_device(block, local, "meta")
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
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> BlockStream:
    """Prune the checkpoint in `checkpoint` block by block into a new sharded checkpoint in `target`."""
    if sparsity == 0:
        raise ValueError("sparsity=0: nothing to prune; use the checkpoint as it is")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = load_meta(checkpoint, dtype)
    stream = BlockStream(model, checkpoint, target)
    engine.prune(model, method, samples, sparsity, device, stream=stream)
    stream.finish(model)
    return stream


@torch.no_grad()
def streamed_perplexity(checkpoint: Path, windows: torch.Tensor, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> float:
    """`bench.evaluate.perplexity` of a checkpoint, computed block by block over all windows at once."""
    model = load_meta(checkpoint, dtype)
    arch = arch_for(model)
    stream = BlockStream(model, checkpoint)
    hidden, kwargs = engine.capture_inputs(model, windows, device)
    kwargs = engine._to_device(kwargs, device)
    for index, block in enumerate(arch.blocks(model)):
        stream.load(index, block)
        hidden = engine.run_block(block.to(device), hidden, kwargs, device)
        stream.release(index, block.to("cpu"), edited=False)
    head = model.get_output_embeddings().to(device)
    norm = _final_norm(model, arch).to(device)
    nlls = torch.empty(windows.shape[0], dtype=torch.float64)
    for row in range(windows.shape[0]):
        logits = head(norm(hidden[row:row + 1].to(device))).float()
        ids = windows[row:row + 1].to(device)
        nlls[row] = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean").item()
    return math.exp(nlls.mean().item())


def _final_norm(model: nn.Module, arch) -> nn.Module:
    base = model.get_submodule(arch.blocks_path.rsplit(".", 1)[0])
    for name in ("norm", "final_layer_norm", "ln_f"):
        if hasattr(base, name):
            return getattr(base, name)
    raise ValueError(f"no final norm found on {type(base).__name__}")


def write_synthetic(directory: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                    vocab: int = 257, seed: int = 0) -> int:
    """A random LLaMA checkpoint with one shard per block, written without ever holding the whole model.
    Returns its size in bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=4096,
                                      tie_word_embeddings=False, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                                      pad_token_id=vocab - 1)
    with init_empty_weights():
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, param in skeleton.named_parameters():
        parts = name.split(".")
        file = f"block-{int(parts[2]):05d}.safetensors" if parts[:2] == ["model", "layers"] else "rest.safetensors"
        groups.setdefault(file, []).append((name, param.shape))
    weight_map, size = {}, 0
    for file, entries in groups.items():
        tensors = {}
        for name, shape in entries:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:  # std 1/sqrt(fan_in) keeps activations O(1) through the random blocks
                tensors[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
            weight_map[name] = file
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        size += (directory / file).stat().st_size
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    return size


def _bench(checkpoint: Path, target: Path, nsamples: int, seqlen: int) -> None:
    import methods
    from bench.config import SparsityPattern
    from methods.pruners.sparsegpt import SparseGPT
    from methods.allocators.uniform import Uniform

    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    samples = torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    method = methods.Method("sparsegpt", Uniform(Uniform.Options()),
                            SparseGPT(SparseGPT.Options(), SparsityPattern("unstructured")))
    start = time.perf_counter()
    stream = prune_streamed(checkpoint, target, method, samples, 0.5)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"checkpoint {size / 2**30:.2f} GiB; SparseGPT 50% streamed in {seconds:.0f} s; measured sparsity "
          f"{stream.sparsity:.4f}; peak RSS {peak / 2**30:.2f} GiB = {peak / size:.3f} of the checkpoint")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming")
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write a random sharded LLaMA checkpoint")
    synthetic.add_argument("directory", type=Path)
    synthetic.add_argument("--layers", type=int, default=12)
    synthetic.add_argument("--hidden", type=int, default=2048)
    synthetic.add_argument("--ffn", type=int, default=5504)
    synthetic.add_argument("--heads", type=int, default=16)
    synthetic.add_argument("--kv-heads", type=int, default=16)
    bench = commands.add_parser("bench", help="SparseGPT 50% streamed: peak RSS / checkpoint size")
    bench.add_argument("checkpoint", type=Path)
    bench.add_argument("--out", type=Path, required=True)
    bench.add_argument("--nsamples", type=int, default=8)
    bench.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        size = write_synthetic(args.directory, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads)
        print(f"wrote {size / 2**30:.2f} GiB to {args.directory}")
    else:
        _bench(args.checkpoint, args.out, args.nsamples, args.seqlen)


if __name__ == "__main__":
    main()
