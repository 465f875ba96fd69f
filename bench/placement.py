"""Where a whole model runs for zero-shot and speed (perplexity and pruning go block by block instead).

On the CPU the model stays where it is. With `device=cuda` it goes whole onto the GPU when one is
visible and it fits there; when the launcher grants several GPUs, or the model does not fit one, it is
dispatched over every visible GPU with accelerate (`infer_auto_device_map` under a `max_memory` per GPU,
then `dispatch_model`, whose hooks move activations between them). Nothing is offloaded to the CPU:
accelerate's offload moves weights to the meta device, and a model that does not fit the granted GPUs
is an error asking for more. After use the hooks are removed and the model is back on the CPU, so the
next model (the dense reference, the pruned one) has the GPUs to itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from bench.core.perplexity import FIT_MARGIN


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def gpu_budget(size: int, free: list[int]) -> Optional[dict[int, int]]:
    """None: the model (`size` bytes) goes whole onto the one visible GPU. Else accelerate's `max_memory`
    for dispatching it over the GPUs with `free` bytes each, keeping FIT_MARGIN of room for activations.
    A model the GPUs cannot hold is a ValueError."""
    if len(free) == 1 and size * FIT_MARGIN < free[0]:
        return None
    budget = {index: int(bytes_free / FIT_MARGIN) for index, bytes_free in enumerate(free)}
    if sum(budget.values()) < size:
        raise ValueError(f"the model needs {size / 2**30:.1f} GiB (plus room for activations) but the {len(free)} "
                         f"visible GPU(s) have {sum(free) / 2**30:.1f} GiB free; raise model.resources.gpus")
    return budget


def device_map(model: nn.Module, budget: dict[int, int]) -> dict[str, int]:
    """accelerate's placement of `model`'s modules on the GPUs of `budget`, never splitting a decoder block."""
    # only multi-GPU placement needs accelerate: importing it costs every other cell for nothing
    from accelerate import infer_auto_device_map

    placement = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules or [])
    spilled = sorted({str(where) for where in placement.values() if not isinstance(where, int)})
    if spilled:
        raise ValueError(f"the model does not fit the GPUs' free memory (accelerate would put part of it on "
                         f"{', '.join(spilled)}); raise model.resources.gpus")
    return placement


def free_gpu_memory() -> list[int]:
    """Free bytes of each visible GPU once PyTorch's caching allocator has returned what it holds unused:
    blocks a layer-wise pass freed still count as used until then (3 GB after a 70B evaluation, enough
    to refuse a model that fits)."""
    torch.cuda.empty_cache()
    return [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]


def placement_of(model: nn.Module, inputs_on: torch.device) -> dict[str, str]:
    """Where `placed` put `model`, as accelerate's device map ({module: device}; {"": device} for a whole
    model on one device)."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return {"": str(inputs_on)}
    return {name: f"cuda:{where}" if isinstance(where, int) else str(where) for name, where in mapping.items()}


@contextmanager
def placed(model: nn.Module, device: str) -> Iterator[torch.device]:
    """`model` on `device` for the with-block, as the module docstring says; yields the device its inputs
    go to (that of the input embeddings)."""
    if device == "cpu":
        yield torch.device("cpu")
        return
    budget = gpu_budget(model_bytes(model), free_gpu_memory())
    if budget is None:
        model.to(device)
    else:
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_module

        dispatch_model(model, device_map(model, budget))
    try:
        yield model.get_input_embeddings().weight.device
    finally:
        if budget is not None:
            remove_hook_from_module(model, recurse=True)
            model.__dict__.pop("hf_device_map", None)  # set by dispatch_model
        model.to("cpu")
        torch.cuda.empty_cache()
