"""Benchmark (run by hand): prune a checkpoint bigger than host memory block by block, streamed from its
safetensors shards (`bench.streaming`), and report peak RSS against the checkpoint's size.

    python scripts/streaming_bench.py synthetic <dir> --layers 12 --hidden 2048 --ffn 5504   # random LLaMA shards
    python scripts/streaming_bench.py bench <dir> --out <pruned dir>   # SparseGPT 50% streamed
    python scripts/streaming_bench.py cell <dir> --out <dir> --stream true|false   # a whole run.py cell

`cell` runs one cell (prune + layer-wise perplexity) through `bench.cell.run_cell`, streamed or in
memory; run each mode in its own process, since peak RSS is per process.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from omegaconf import OmegaConf
from safetensors.torch import save_file

from bench import streaming
from bench.cell import run_cell
from bench.compose import compose
from bench.config import validate
from bench.models import byte_tokenizer
from bench.core.families import block_of
from bench.core.vocab import UNSTRUCTURED
from methods.allocators.uniform import Uniform
from methods.base import Method
from methods.pruners.sparsegpt import SparseGPT

INDEX_FILE = streaming.INDEX_FILE


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
        block = block_of(name)
        file = "rest.safetensors" if block is None else f"block-{block:05d}.safetensors"
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
    byte_tokenizer().save_pretrained(directory)  # vocab 257: what the cell tokenizes calibration text with
    return size


def _bench(checkpoint: Path, target: Path, nsamples: int, seqlen: int) -> None:
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    samples = torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    method = Method("sparsegpt", Uniform(Uniform.Options()), SparseGPT(SparseGPT.Options(), UNSTRUCTURED))
    start = time.perf_counter()
    stream, _ = streaming.prune_streamed(checkpoint, target, method, samples, 0.5)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"checkpoint {size / 2**30:.2f} GiB; SparseGPT 50% streamed in {seconds:.0f} s; measured sparsity "
          f"{stream.sparsity:.4f}; peak RSS {peak / 2**30:.2f} GiB = {peak / size:.3f} of the checkpoint")


def _cell(checkpoint: Path, out: Path, stream: str, method: str, nsamples: int, seqlen: int, windows: int) -> None:
    size = streaming.checkpoint_bytes(checkpoint)
    overrides = ["model=llama-tiny", f"model.path={checkpoint}", f"model.stream={stream}", f"method={method}",
                 "sparsity=0.5", "cache=false", "data=pydoc", "eval.ppl.datasets=[pydoc]",
                 f"data.calib.nsamples={nsamples}", f"data.calib.seqlen={seqlen}", f"eval.ppl.seqlen={seqlen}",
                 f"eval.ppl.max_windows={windows}", "eval.ppl.layerwise=true", f"save_dir={out / 'pruned'}"]
    cfg = compose(overrides)
    start = time.perf_counter()
    result = run_cell(validate(cfg), OmegaConf.to_container(cfg, resolve=True), out / "cell", rerun="all")
    seconds = time.perf_counter() - start
    if result.status != "ok":
        raise SystemExit(f"cell failed: {result.error.message}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"checkpoint {size / 2**30:.2f} GiB; {method} 50% cell (stream={stream}) in {seconds:.0f} s "
          f"(prune {result.timings.get('prune', 0):.0f} s, ppl {result.timings.get('eval_ppl_pydoc', 0):.0f} s); "
          f"measured sparsity {result.sparsity['measured']:.4f}; ppl {result.metrics['ppl']['pydoc']:.4f}; "
          f"peak RSS {peak / 2**30:.2f} GiB = {peak / size:.3f} of the checkpoint")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/streaming_bench.py")
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
    cell = commands.add_parser("cell", help="one whole cell (prune + perplexity), streamed or in memory")
    cell.add_argument("checkpoint", type=Path)
    cell.add_argument("--out", type=Path, required=True)
    cell.add_argument("--stream", choices=("true", "false"), required=True)
    cell.add_argument("--method", default="wanda")
    cell.add_argument("--nsamples", type=int, default=4)
    cell.add_argument("--seqlen", type=int, default=128)
    cell.add_argument("--windows", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        size = write_synthetic(args.directory, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads)
        print(f"wrote {size / 2**30:.2f} GiB to {args.directory}")
    elif args.command == "cell":
        _cell(args.checkpoint, args.out, args.stream, args.method, args.nsamples, args.seqlen, args.windows)
    else:
        _bench(args.checkpoint, args.out, args.nsamples, args.seqlen)


if __name__ == "__main__":
    main()
