"""Pruners by the name `method.pruner` gives them: one line per pruner."""
from methods.pruners.cfsp_fine import CFSPFine
from methods.pruners.flap import FLAP
from methods.pruners.magnitude import Magnitude
from methods.pruners.magnitude_sp import MagnitudeSP
from methods.pruners.none import NoPruning
from methods.pruners.sparsegpt import SparseGPT
from methods.pruners.wanda import Wanda
from methods.pruners.wanda_sp import WandaSP

PRUNERS = {"none": NoPruning, "magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT,
           "cfsp_fine": CFSPFine, "magnitude_sp": MagnitudeSP, "wanda_sp": WandaSP, "flap": FLAP}
