"""Pruning methods as the composition allocator x pruner.

- An *allocator* decides the sparsity of every prunable linear: `allocate(sizes, target)` returns
  {full linear name: sparsity}. One that needs global information about the dense model sets
  `needs_dense_pass = True` and `stats_level`; the engine then calls `observe_block(view)` on every
  block of the dense model first.
- A *pruner* removes weights inside one block given those rates: `prune_block(view, rates)`. Its
  `stats_level` ("none", "diag", "full") says which input statistics the engine must collect.
- A *structured* pruner (`methods.base.ChannelPruner`, `structured = True`) removes FFN channels
  physically; the rate of a block's FFN linears is its fraction of channels removed. It may score
  channels on the dense model (`needs_dense_pass`, `observe_level`): the engine then runs one
  observe-only pass shared with the allocator. Its options carry the recovery keys
  (`methods.recovery.RecoveryOptions`), which the cell applies after pruning.
Each component has a nested `Options` dataclass: the schema of its keys under `method.` in the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from methods.allocators.cfsp_coarse import CFSPCoarse
from methods.allocators.uniform import Uniform
from methods.pruners.cfsp_fine import CFSPFine
from methods.pruners.flap import FLAP
from methods.pruners.magnitude import Magnitude
from methods.pruners.magnitude_sp import MagnitudeSP
from methods.pruners.none import NoPruning
from methods.pruners.sparsegpt import SparseGPT
from methods.pruners.wanda import Wanda
from methods.pruners.wanda_sp import WandaSP

ALLOCATORS = {"uniform": Uniform, "cfsp_coarse": CFSPCoarse}
PRUNERS = {"none": NoPruning, "magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT,
           "cfsp_fine": CFSPFine, "magnitude_sp": MagnitudeSP, "wanda_sp": WandaSP, "flap": FLAP}


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
