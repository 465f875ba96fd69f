"""Layer-wise sparsity schedule from inverse-Hessian loss estimates (Zhang et al. 2024, "Aggressive
Post-Training Compression on Extremely Large Language Models", arXiv 2409.20094).

The paper's code is not public; this is our reading of it, every choice below is a config key.

1. Estimate, on the dense model, the loss of pruning every prunable linear ("layer") at each candidate
   sparsity in `levels`. With H = 2 X X^T / n (the Hessian SparseGPT uses, dampened the same way by
   `percdamp`) the layer loss is the per-token squared output error ||(W - W') X||^2 / n:
   - `error: obs` (default, cheap): the sum of the independent OBS errors w^2 / (2 [H^-1]_jj) of the
     weights the mask would remove, the mask being the lowest fraction of those errors over the whole
     matrix (interactions between removed weights and the OBS update are ignored);
   - `error: exact`: run SparseGPT (`blocksize`, `percdamp`) at each level and measure
     (W - W') H (W - W')^T / 2 exactly (one SparseGPT solve per level per layer: slower).
   `loss: absolute` clusters these errors as they are; `loss: relative` divides each by the layer's
   dense output energy ||W X||^2 / n, so that a layer is not judged cheap merely for having few
   output rows (GQA k/v) or small inputs (early blocks), nor expensive for large ones. Default
   `relative`: on SmolLM2-135M at 70% the absolute losses gave a schedule worse than uniform
   SparseGPT, the relative ones a better one (numbers in the project notes for issue 4).
   Only len(levels) numbers per layer are kept; every Hessian is dropped as soon as its block is done.
   Statistics come from one observe-only pass over the *dense* model (the paper's "sequentially
   pruning all" assumption lets the loss of each layer be estimated before any layer is pruned).
2. Take each layer's estimate at the candidate level nearest the target sparsity, and cluster the
   layers by log-loss with 1-D K-means into `k` clusters (Lloyd's algorithm from quantile-spaced
   initial centroids, so it is deterministic). In 1-D the clusters are intervals of log-loss.
3. Rank the clusters from highest to lowest loss; cluster r gets sparsity b + step * (r - (K-1)/2),
   clipped to [min(levels), max(levels)] (K = non-empty clusters), so a higher-loss layer never gets a
   higher sparsity than a lower-loss one. The shift b is solved (bisection, the mean is monotone in b)
   so that the parameter-weighted mean sparsity equals the target exactly; any target inside
   [min(levels), max(levels)] is reachable, others are rejected at config time.
4. The estimate models SparseGPT's error (OBS), not every pruner's. With `realised_pruner` (the presets
   set it to their own pruner) the dense pass also prunes a copy of every layer with that pruner at each
   level and measures its error the same way; the record's `realised_fit` is the Spearman correlation,
   over layers at the level the schedule used, between the estimate and that realised error, so a
   result shows when the schedule does not fit its pruner. It costs one prune per layer per level
   (SparseGPT: as much as `error: exact`).
Assumptions where the paper is silent: per-linear granularity (not per block), the normalisation
of the losses (`loss`), the level spacing `step`, and the loss taken at the nearest candidate level.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from bench.core.vocab import UNSTRUCTURED, ConfigError, check_choice, check_range
from methods import registry
from methods.base import Allocator, LinearPruner
from methods.pruners.sparsegpt import inverse_hessian_factor, sparsegpt
from methods.rates import shift_to_mean
from methods.registry import register_allocator

log = logging.getLogger(__name__)

ERRORS = ("obs", "exact")
LOSSES = ("absolute", "relative")


@register_allocator("loss_estimate")
class LossEstimate(Allocator):
    needs_dense_pass = True
    observe_level = "full"

    @dataclass
    class Options:
        levels: list = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])  # candidate sparsities
        k: int = 3  # K-means clusters of layers (by log-loss)
        step: float = 0.05  # sparsity difference between adjacent clusters before the mean is solved
        error: str = "obs"  # obs: sum of OBS errors of the removed weights | exact: SparseGPT's error
        loss: str = "relative"  # relative (divided by the dense output energy ||WX||^2/n) | absolute
        percdamp: float = 0.01  # dampening of H, as in SparseGPT
        blocksize: int = 128  # SparseGPT block size (error=exact only)
        realised_pruner: Optional[str] = None  # a linear pruner whose realised error the estimate is ranked against

        def __post_init__(self):
            levels = [float(v) for v in self.levels]
            check_range("method.levels", self.levels,
                        bool(levels) and levels == sorted(set(levels)) and all(0 <= v < 1 for v in levels),
                        "strictly increasing sparsities in [0, 1)")
            check_range("method.k", self.k, self.k >= 1, ">= 1")
            check_range("method.step", self.step, self.step >= 0, ">= 0")
            check_choice("method.error", self.error, ERRORS)
            check_choice("method.loss", self.loss, LOSSES)
            check_range("method.percdamp", self.percdamp, 0 <= self.percdamp < 1, "0 <= percdamp < 1")
            if self.realised_pruner is not None:
                cls = registry.pruner(self.realised_pruner, "method.realised_pruner")
                check_range("method.realised_pruner", self.realised_pruner, issubclass(cls, LinearPruner),
                            "a pruner of single linears (wanda, sparsegpt, magnitude)")

    def __init__(self, options: Options):
        super().__init__(options)
        self.levels = [float(v) for v in options.levels]
        self.losses: dict[str, np.ndarray] = {}  # layer -> estimated loss at each candidate level
        self.realised: dict[str, np.ndarray] = {}  # layer -> realised_pruner's error at each level
        self.record: dict = {}

    def check(self, target: float, n_layers: Optional[int]) -> None:
        low, high = self.levels[0], self.levels[-1]
        if not low <= target <= high:
            raise ConfigError(f"sparsity={target} cannot be reached with method.levels={self.levels}; "
                              f"allowed: {low} <= sparsity <= {high} (or widen method.levels)")
        if n_layers is not None and self.options.k > n_layers:
            raise ConfigError(f"method.k={self.options.k} is larger than the number of prunable layers "
                              f"({n_layers}); allowed: 1..{n_layers}")

    def dense_state(self) -> dict:
        return {"losses": self.losses, "realised": self.realised}

    def load_dense_state(self, state: dict) -> None:
        self.losses, self.realised = state["losses"], state["realised"]

    @torch.no_grad()
    def observe_block(self, view) -> None:
        factors = {}  # one inverse per input group (q/k/v share their statistics)
        for name, linear in view.linears.items():
            stats = view.stats[name]
            W = linear.weight.float()
            hessian = stats.hessian().to(W.device)
            if self.options.error == "obs":
                if id(stats) not in factors:
                    U, dead = inverse_hessian_factor(hessian, self.options.percdamp)
                    factors[id(stats)] = ((U ** 2).sum(0), dead)  # diag(H^-1) = diag(U^T U)
                inverse_diag, dead = factors[id(stats)]
                errors = (W ** 2 / (2 * inverse_diag)).masked_fill(dead.unsqueeze(0), 0).flatten()
                cumulative = torch.cat([errors.new_zeros(1), errors.sort().values.double().cumsum(0)])
                losses = [float(cumulative[round(s * errors.numel())]) for s in self.levels]
            else:
                losses = []
                for s in self.levels:
                    delta = W - sparsegpt(W, hessian, s, UNSTRUCTURED,
                                          self.options.blocksize, self.options.percdamp)
                    losses.append(float(((delta @ hessian) * delta).sum() / 2))
            realised = self._realised(W, stats, hessian)
            if self.options.loss == "relative":
                energy = float(((W @ hessian) * W).sum() / 2)
                losses = [loss / energy if energy > 0 else 0.0 for loss in losses]
                realised = [e / energy if energy > 0 else 0.0 for e in realised]
            self.losses[name] = np.array(losses)
            if realised:
                self.realised[name] = np.array(realised)

    def _realised(self, W: torch.Tensor, stats, hessian: torch.Tensor) -> list[float]:
        """`realised_pruner`'s output error (W - W') H (W - W')^T / 2 at each level; [] without one."""
        if self.options.realised_pruner is None:
            return []
        cls = registry.pruner(self.options.realised_pruner, "method.realised_pruner")
        pruner = cls(cls.Options(), UNSTRUCTURED)
        errors = []
        for s in self.levels:
            pruned = W.clone()
            pruner.prune_linear(pruned, stats, s)
            delta = W - pruned
            errors.append(float(((delta @ hessian) * delta).sum() / 2))
        return errors

    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        names = list(sizes)
        missing = [name for name in names if name not in self.losses]
        if missing:
            raise RuntimeError(f"no loss estimate for {missing[0]}: observe_block must see every block first")
        nearest = int(np.argmin([abs(level - target) for level in self.levels]))
        log_loss = np.log(np.array([self.losses[name][nearest] for name in names]) + 1e-30)
        rank = cluster_ranks(log_loss, self.options.k)
        offsets = self.options.step * (rank - (rank.max()) / 2)
        weights = np.array([sizes[name] for name in names], dtype=np.float64)
        rates = shift_to_mean(offsets, weights, target, self.levels[0], self.levels[-1])
        for r in range(int(rank.max()) + 1):
            members = rank == r
            log.info("loss_estimate cluster %d (loss high->low): %d layers, log-loss %.2f..%.2f, sparsity %.4f",
                     r, members.sum(), log_loss[members].min(), log_loss[members].max(), rates[members][0])
        if self.realised:
            realised = np.array([self.realised[name][nearest] for name in names])
            self.record = {"realised_fit": {"pruner": self.options.realised_pruner, "level": self.levels[nearest],
                                            "layers": len(names), "spearman": spearman(log_loss, realised)}}
        return {name: float(rate) for name, rate in zip(names, rates)}

    def finish(self) -> dict:
        return self.record


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank); 0 when either side is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def kmeans_1d(x: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Cluster labels of 1-D data, renumbered 0.. in increasing centroid order (empty clusters dropped)."""
    k = min(k, len(np.unique(x)))
    centroids = np.quantile(x, (np.arange(k) + 0.5) / k)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iterations):
        labels = np.abs(x[:, None] - centroids[None, :]).argmin(1)
        updated = np.array([x[labels == c].mean() if (labels == c).any() else centroids[c] for c in range(k)])
        if np.allclose(updated, centroids):
            break
        centroids = updated
    used = sorted(set(labels), key=lambda c: centroids[c])
    return np.array([used.index(c) for c in labels])


def cluster_ranks(log_loss: np.ndarray, k: int) -> np.ndarray:
    """Rank of each layer's cluster: 0 = the highest-loss cluster (it will get the lowest sparsity)."""
    labels = kmeans_1d(log_loss, k)
    return labels.max() - labels
