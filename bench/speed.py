"""Inference throughput of a pruned model against its dense original, measured in the same process
with the same inputs, so the ratio survives a noisy shared machine better than absolute numbers.

- prefill: one forward of (batch, prefill_seqlen) random tokens; only the last position's logits are
  computed, as generation does (`logits_to_keep=1`); tokens/s = batch x prefill_seqlen / time.
- decode: after that prefill (with a KV cache), `decode_tokens` single-token steps, greedy;
  tokens/s = batch x decode_tokens / time (the prefill not timed).
Dense and pruned runs are interleaved `repeats` times after one warm-up each; the median is reported.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from bench.config import SpeedConfig


@torch.no_grad()
def _prefill(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return ids.numel() / (time.perf_counter() - start)


@torch.no_grad()
def _decode(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return token.shape[0] * steps / (time.perf_counter() - start)


def measure(dense: nn.Module, pruned: nn.Module, cfg: SpeedConfig, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dense.config.vocab_size, (cfg.batch, cfg.prefill_seqlen), generator=generator).to(device)
    models = {"dense": dense.to(device).eval(), "pruned": pruned.to(device).eval()}
    runs = {name: {"prefill": [], "decode": []} for name in models}
    for repeat in range(cfg.repeats + 1):
        for name, model in models.items():
            prefill, decode = _prefill(model, ids), _decode(model, ids, cfg.decode_tokens)
            if repeat:  # the first round warms up allocators and caches
                runs[name]["prefill"].append(prefill)
                runs[name]["decode"].append(decode)
    for model in models.values():
        model.to("cpu")
    result = {"batch": cfg.batch, "prefill_seqlen": cfg.prefill_seqlen, "decode_tokens": cfg.decode_tokens,
              "repeats": cfg.repeats, "device": device}
    for stage in ("prefill", "decode"):
        dense_tps = statistics.median(runs["dense"][stage])
        pruned_tps = statistics.median(runs["pruned"][stage])
        result[f"{stage}_tokens_per_s"] = {"dense": dense_tps, "pruned": pruned_tps}
        result[f"{stage}_speedup"] = pruned_tps / dense_tps
    return result
