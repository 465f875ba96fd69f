"""Pruning methods as the composition allocator x pruner.

- An *allocator* decides the sparsity of every prunable linear: `allocate(sizes, target)` returns
  {full linear name: sparsity}. One that needs global information about the dense model sets
  `needs_dense_pass = True` and `stats_level`; the engine then calls `observe_block(view)` on every
  block of the dense model first.
  `check(target, n_layers)` raises ConfigError for a target it cannot reach (n_layers = number of
  prunable linears, None when unknown before loading); run at config time and again before pruning.
- A *pruner* removes weights inside one block given those rates: `prune_block(view, rates)`. Its
  `stats_level` ("none", "diag", "full") says which input statistics the engine must collect.
Each component has a nested `Options` dataclass: the schema of its keys under `method.` in the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from methods.allocators.loss_estimate import LossEstimate
from methods.allocators.owl import OWL
from methods.allocators.uniform import Uniform
from methods.pruners.magnitude import Magnitude
from methods.pruners.none import NoPruning
from methods.pruners.sparsegpt import SparseGPT
from methods.pruners.wanda import Wanda

ALLOCATORS = {"uniform": Uniform, "loss_estimate": LossEstimate, "owl": OWL}
PRUNERS = {"none": NoPruning, "magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


@dataclass
class Method:
    name: str
    allocator: Any
    pruner: Any


def build(spec) -> Method:
    """Instantiate the components of a validated `bench.config.MethodSpec`."""
    return Method(name=spec.name,
                  allocator=ALLOCATORS[spec.allocator](spec.allocator_options),
                  pruner=PRUNERS[spec.pruner](spec.pruner_options, spec.pattern))
