"""Zero-shot and speed on several GPUs: the placement decision (one GPU, or dispatched over all visible
ones) with made-up free memory, accelerate's device map over fake GPUs, and the speed schedule that
never puts the dense and the pruned model on the GPUs together. The dispatch itself needs GPUs."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from bench import models, placement, progress, speed
from bench.config import zoo_entry
from bench.speed import SpeedConfig
from bench.core import perplexity
from bench.core.perplexity import FIT_MARGIN

GIB = 2**30


def test_a_model_that_fits_the_one_visible_gpu_goes_there_whole():
    assert placement.gpu_budget(10 * GIB, [40 * GIB]) is None


def test_several_gpus_get_a_budget_each_with_room_for_activations():
    budget = placement.gpu_budget(10 * GIB, [40 * GIB, 30 * GIB])  # fits one, but two were granted
    assert budget == {0: int(40 * GIB / FIT_MARGIN), 1: int(30 * GIB / FIT_MARGIN)}
    big = placement.gpu_budget(100 * GIB, [78 * GIB, 78 * GIB])  # fits none alone
    assert sorted(big) == [0, 1] and sum(big.values()) >= 100 * GIB


@pytest.mark.parametrize("free", [[40 * GIB], [40 * GIB, 40 * GIB]])
def test_a_model_the_gpus_cannot_hold_asks_for_more_gpus(free):
    with pytest.raises(ValueError, match=r"needs 100.0 GiB .* raise model.resources.gpus"):
        placement.gpu_budget(100 * GIB, free)


class _CachingGPUs:
    """torch.cuda's memory queries over GPUs whose allocator caches `cached` bytes until empty_cache()."""

    def __init__(self, monkeypatch, count, free, cached):
        self.free, self.cached = free, cached
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free - self.cached, 80 * GIB))
        monkeypatch.setattr(torch.cuda, "empty_cache", self.empty_cache)

    def empty_cache(self):
        self.cached = 0


def test_free_gpu_memory_is_measured_after_releasing_the_allocators_cache(monkeypatch):
    """LLaMA-2-70B in fp16 (129 GiB) fits two 80 GB GPUs with 78 GiB free each, but not with the 3 GiB a
    layer-wise evaluation left cached on each."""
    assert placement.gpu_budget(129 * GIB, [78 * GIB, 78 * GIB]) is not None
    with pytest.raises(ValueError, match="raise model.resources.gpus"):
        placement.gpu_budget(129 * GIB, [75 * GIB, 75 * GIB])
    _CachingGPUs(monkeypatch, count=2, free=78 * GIB, cached=3 * GIB)
    seen = []
    monkeypatch.setattr(placement, "gpu_budget", lambda size, free: seen.append(free) or {0: size, 1: size})
    monkeypatch.setattr(placement, "device_map", lambda model, budget: {"": 0})
    # accelerate is imported where a model is dispatched (bench/placement.py), so it is patched at its source
    monkeypatch.setattr("accelerate.dispatch_model", lambda model, device_map: model)
    monkeypatch.setattr("accelerate.hooks.remove_hook_from_module", lambda model, recurse: None)
    model = models.load(zoo_entry("llama-tiny"))[0]
    with placement.placed(model, "cuda"):
        pass
    assert seen == [[78 * GIB, 78 * GIB]]


def test_the_layerwise_choice_measures_free_memory_after_releasing_the_cache(monkeypatch):
    model = models.load(zoo_entry("llama-tiny"))[0]
    size = placement.model_bytes(model)
    _CachingGPUs(monkeypatch, count=1, free=int(size * FIT_MARGIN) + 1024, cached=size)
    assert perplexity.fits(model, "cuda:0")


def test_the_device_map_splits_between_blocks_over_the_gpus():
    model = models.load(zoo_entry("llama-tiny"))[0]
    size = placement.model_bytes(model)
    budget = {0: int(size * 0.9), 1: int(size * 0.9)}  # neither holds it alone
    placement_map = placement.device_map(model, budget)
    assert set(placement_map.values()) == {0, 1}
    assert not any(".layers.0." in name or ".layers.1." in name for name in placement_map)  # blocks whole
    with pytest.raises(ValueError, match="does not fit the GPUs' free memory"):
        placement.device_map(model, {0: size // 4})


def test_on_the_cpu_the_model_stays_where_it_is():
    model = models.load(zoo_entry("llama-tiny"))[0]
    weight = model.get_input_embeddings().weight
    with placement.placed(model, "cpu") as inputs_on:
        assert inputs_on == torch.device("cpu") and model.get_input_embeddings().weight is weight


def _pair():
    dense = models.load(zoo_entry("llama-tiny"))[0]
    return dense, copy.deepcopy(dense)


@pytest.mark.parametrize("device, order", [("cpu", ["dense", "pruned"] * 3),
                                           ("cuda", ["dense"] * 3 + ["pruned"] * 3)])
def test_speed_is_timed_with_torch_benchmark_and_gpus_hold_one_model_at_a_time(device, order, monkeypatch):
    dense, pruned = _pair()
    names = {id(dense): "dense", id(pruned): "pruned"}
    on_device, timed = [], []

    @contextmanager
    def placed(model, where):  # records what is on the device; runs on the CPU
        assert not on_device, "two models on the device at once"
        on_device.append(names[id(model)])
        yield torch.device("cpu")
        on_device.remove(names[id(model)])

    class Timer(speed.Timer):
        def timeit(self, number):
            timed.append(on_device[0])
            return super().timeit(number)

    monkeypatch.setattr(speed.placement, "placed", placed)
    monkeypatch.setattr(speed, "Timer", Timer)
    steps = []
    result = speed.measure(dense, pruned, SpeedConfig(batch=1, prefill_seqlen=8, decode_tokens=2, repeats=2), device,
                           on_step=lambda name, index, total, seconds: steps.append((name, index, total)))
    assert timed[::2] == timed[1::2] == order  # prefill then decode, per round: warm-up + 2 repeats
    assert steps == [("speed", index, 6) for index in range(6)]  # a step per model per round, for progress.json
    assert all(name in progress.STEP_UNITS for name, _, _ in steps)
    for stage in ("prefill", "decode"):
        assert all(tps > 0 for tps in result[f"{stage}_tokens_per_s"].values())
        assert result[f"{stage}_speedup"] > 0


def test_speed_records_each_models_device_map_and_whether_both_ran_on_one_device(monkeypatch):
    dense, pruned = _pair()
    config = SpeedConfig(batch=1, prefill_seqlen=8, decode_tokens=2, repeats=1)
    alone = speed.measure(dense, pruned, config, "cpu")
    assert alone["device_map"] == {"dense": {"": "cpu"}, "pruned": {"": "cpu"}} and alone["single_device"]

    @contextmanager
    def placed(model, where):  # the dense model dispatched over two GPUs, as accelerate marks it
        if model is dense:
            model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
        yield torch.device("cpu")
        model.__dict__.pop("hf_device_map", None)

    monkeypatch.setattr(speed.placement, "placed", placed)
    split = speed.measure(dense, pruned, config, "cuda")
    assert set(split["device_map"]["dense"].values()) == {"cuda:0", "cuda:1"}
    assert split["device_map"]["pruned"] == {"": "cpu"} and not split["single_device"]
