"""Cross-check `save_format=bitmask` against compressed-tensors' own sparse-bitmask compressor.

compressed-tensors has no sparse compressor after 0.14.0.1, and 0.14.0.1 declares transformers<5, so it
cannot be installed beside prunebench's transformers. Put it on a side path instead:

    pip install --no-deps --target /tmp/ct14 compressed-tensors==0.14.0.1 loguru
    PYTHONPATH=/tmp/ct14:. python scripts/check_compressed_tensors.py --out /tmp/ct_check

Saves a 2:4-pruned tiny LLaMA dense and as bitmask, then checks that the library's
`BitmaskCompressor.decompress` restores the dense weights from our file, that its `compress_weight` gives
our stored tensors bit for bit (names, dtypes, values), and that our sparsity config parses as its
`SparsityCompressionConfig`; prints both file sizes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from compressed_tensors import __version__ as ct_version
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import SparsityCompressionConfig
from safetensors.torch import load_file

from bench import checkpoint, models
from bench.compose import compose
from bench.config import validate
from methods import catalog, lifecycle


def _state(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new dir for the two checkpoints")
    args = parser.parse_args()

    cfg = validate(compose(["model=llama-tiny", "method=magnitude", "method.sparsity_type=2:4"]))
    model, tokenizer = models.load(cfg.model)
    lifecycle.prune(model, catalog.build(cfg.method), torch.empty(0), cfg.sparsity, "cpu")  # magnitude: data-free
    dense_dir = models.save(model, tokenizer, args.out / "dense")
    packed_dir = models.save(model, tokenizer, args.out / "bitmask", save_format="bitmask")
    dense, ours = _state(dense_dir), _state(packed_dir)

    ours_config = json.loads((packed_dir / "config.json").read_text())[checkpoint.SPARSITY_KEY]
    theirs_config = SparsityCompressionConfig.load_from_registry(ours_config["format"], **ours_config)
    assert theirs_config.model_dump(include=set(ours_config)) == ours_config, (theirs_config, ours_config)
    compressor = BaseCompressor.load_from_registry(ours_config["format"], config=theirs_config)

    restored = dict(compressor.decompress(str(packed_dir)))
    targets = [f"{name}.weight" for name in ours_config["targets"]]
    assert all(torch.equal(restored[key], dense[key]) for key in targets)
    for key in targets:
        for name, tensor in compressor.compress_weight(key.removesuffix(".weight"), dense[key]).items():
            assert tensor.dtype == ours[name].dtype and torch.equal(tensor, ours[name]), name

    size = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (dense_dir, packed_dir)}
    print(f"compressed-tensors {ct_version}: decompress() restores all {len(targets)} pruned weights of our file; "
          f"compress_weight() gives our tensors bit for bit; our sparsity config parses as "
          f"{type(theirs_config).__name__}")
    print(f"weights on disk: dense {size['dense']} bytes, bitmask {size['bitmask']} bytes "
          f"({size['bitmask'] / size['dense']:.2f} of dense)")


if __name__ == "__main__":
    main()
