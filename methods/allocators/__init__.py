"""Allocators by the name `method.allocator` gives them: one line per allocator."""
from methods.allocators.cfsp_coarse import CFSPCoarse
from methods.allocators.loss_estimate import LossEstimate
from methods.allocators.owl import OWL
from methods.allocators.self_pruner import SelfPruner
from methods.allocators.uniform import Uniform

ALLOCATORS = {"uniform": Uniform, "owl": OWL, "loss_estimate": LossEstimate, "cfsp_coarse": CFSPCoarse,
              "self_pruner": SelfPruner}
