"""Inference throughput of a pruned model against its dense original, measured in the same process
with the same inputs, so the ratio survives a noisy shared machine better than absolute numbers.

- prefill: one forward of (batch, prefill_seqlen) random tokens; only the last position's logits are
  computed, as generation does (`logits_to_keep=1`); tokens/s = batch x prefill_seqlen / time.
- decode: after that prefill (with a KV cache), `decode_tokens` single-token steps, greedy;
  tokens/s = batch x decode_tokens / time (the prefill not timed).
Times come from `torch.utils.benchmark.Timer`, which synchronises the GPU before reading the clock
(CUDA kernels run asynchronously: a plain clock would time their launch only). Each model runs one
warm-up, then `repeats` timed rounds; the median is reported. On the CPU, where both models live anyway,
dense and pruned rounds are interleaved, so load from other processes slows both alike; on GPUs each
model is placed (bench/placement.py: one GPU, or dispatched over several), timed and released in turn,
so the two never occupy the GPUs together. Each model's device map is recorded with the speed-ups, and
`single_device` says whether both ran whole on the same one device, as the papers measure.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.benchmark import Timer

from bench import placement
from bench.core.engine import OnStep
from bench.core.vocab import check_range

SPREAD_LIMIT = 0.25  # rounds of one model further apart than this (relative to their median): not a reading
SPEED_STEPS = {"speed": "round"}  # one model's prefill and decode; `on_step` hears of each


@dataclass
class SpeedConfig:
    """Inference throughput of a structurally pruned model vs its dense original, same run and shapes."""

    batch: int = 1
    prefill_seqlen: int = 128
    decode_tokens: int = 32  # generated one at a time with a KV cache, after a prefill of prefill_seqlen
    repeats: int = 3  # median over interleaved dense/pruned repeats

    def __post_init__(self):
        for key, value in vars(self).items():
            check_range(f"eval.speed.{key}", value, value >= 1, ">= 1")



def _seconds(run) -> float:
    """Wall time of one call of `run`, with the torch threads the cell runs with (Timer's default is 1)."""
    return Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads()).timeit(1).mean


@torch.no_grad()
def _prefill(model: nn.Module, ids: torch.Tensor) -> float:
    return ids.numel() / _seconds(lambda: model(ids, use_cache=False, logits_to_keep=1))


@torch.no_grad()
def _decode(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    # `cache`, not `past_key_values`: transformers renamed it and drops the old name in 5.40
    out = model(ids, use_cache=True, logits_to_keep=1)
    state = {"cache": out.cache, "token": out.logits[:, -1:].argmax(-1)}

    def generate():
        for _ in range(steps):
            out = model(state["token"], cache=state["cache"], use_cache=True)
            state["cache"], state["token"] = out.cache, out.logits[:, -1:].argmax(-1)

    return ids.shape[0] * steps / _seconds(generate)


def measure(dense: nn.Module, pruned: nn.Module, cfg: SpeedConfig, device: str, seed: int = 0,
            on_step: OnStep = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dense.config.vocab_size, (cfg.batch, cfg.prefill_seqlen), generator=generator)
    models = {"dense": dense.eval(), "pruned": pruned.eval()}
    rounds = cfg.repeats + 1  # the first warms up allocators and caches, and is not reported
    if device == "cpu":
        schedule = [name for _ in range(rounds) for name in models]
    else:
        schedule = [name for name in models for _ in range(rounds)]
    runs = {name: {"prefill": [], "decode": []} for name in models}
    step = itertools.count()
    maps = {}
    for name, group in itertools.groupby(schedule):
        with placement.placed(models[name], device) as inputs_on:
            maps[name] = placement.placement_of(models[name], inputs_on)
            on_device = ids.to(inputs_on)
            for _ in group:
                start = time.perf_counter()
                runs[name]["prefill"].append(_prefill(models[name], on_device))
                runs[name]["decode"].append(_decode(models[name], on_device, cfg.decode_tokens))
                if on_step is not None:
                    on_step("speed", next(step), len(schedule), time.perf_counter() - start)
    result = {"batch": cfg.batch, "prefill_seqlen": cfg.prefill_seqlen, "decode_tokens": cfg.decode_tokens,
              "repeats": cfg.repeats, "device": device, "device_map": maps,
              # the papers time one device; a dispatched model also pays the hops between GPUs
              "single_device": maps["dense"] == maps["pruned"] and len(set(maps["dense"].values())) == 1}
    for stage in ("prefill", "decode"):
        dense_tps = statistics.median(runs["dense"][stage][1:])  # the first round warmed up
        pruned_tps = statistics.median(runs["pruned"][stage][1:])
        result[f"{stage}_tokens_per_s"] = {"dense": dense_tps, "pruned": pruned_tps}
        result[f"{stage}_speedup"] = pruned_tps / dense_tps
        # how far apart a model's timed rounds are, relative to their median: the trust a median deserves
        result[f"{stage}_spread"] = {name: (max(runs[name][stage][1:]) - min(runs[name][stage][1:]))
                                     / statistics.median(runs[name][stage][1:]) for name in models}
    return result


def unsteady(measured: dict) -> list[str]:
    """A warning per speed-up whose timed rounds disagree by more than SPREAD_LIMIT (a busy machine, a stall
    in one round): the median of such rounds is no reading of the models."""
    notes = []
    for stage in ("prefill", "decode"):
        spread = measured.get(f"{stage}_spread") or {}
        worst = max(spread, key=spread.get, default=None)
        if worst is not None and spread[worst] > SPREAD_LIMIT:
            notes.append(f"{stage} speed-up {measured[f'{stage}_speedup']:.2f}x is unsteady: the {worst} model's "
                         f"{measured['repeats']} timed rounds differ by {spread[worst]:.0%} of their median (over "
                         f"{SPREAD_LIMIT:.0%}); measure on an idle machine or with more eval.speed.repeats")
    return notes
