"""The pruners' defining properties on synthetic layers: OBS reconstruction, exact sparsity, N:M; and the
registry every component is found by."""
from __future__ import annotations

import pkgutil

import pytest
import torch

from bench.core.vocab import ConfigError, SparsityPattern
from bench.core.engine import InputStats
from methods import allocators, catalog, pruners, registry
from methods.base import LinearPruner
from methods.pruners.magnitude import Magnitude
from methods.pruners.sparsegpt import SparseGPT
from methods.pruners.wanda import Wanda

UNSTRUCTURED = SparsityPattern.parse("unstructured")


def correlated_layer(rows=48, cols=128, tokens=1024, seed=0):
    """A weight and calibration inputs with correlated, unevenly scaled features (as in real LLMs)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / cols ** 0.5
    scales = torch.rand(cols, generator=gen) * 3 + 0.1
    X = (torch.randn(tokens, cols, generator=gen) @ mixing + 0.3 * torch.randn(tokens, cols, generator=gen)) * scales
    W = torch.randn(rows, cols, generator=gen)
    stats = InputStats(ntokens=tokens, x_sum=X.sum(0), sq_sum=(X * X).sum(0), xtx=X.T @ X)
    return W, X, stats


def pruned(pruner, W, stats, sparsity):
    weight = W.clone()
    pruner.prune_linear(weight, stats, sparsity)
    return weight


def reconstruction_error(W, W_pruned, X):
    return ((X @ W.T - X @ W_pruned.T) ** 2).sum().item()


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(sparsity):
    W, X, stats = correlated_layer()
    err_sparsegpt = reconstruction_error(W, pruned(SparseGPT(SparseGPT.Options(), UNSTRUCTURED), W, stats, sparsity), X)
    err_wanda = reconstruction_error(W, pruned(Wanda(Wanda.Options(), UNSTRUCTURED), W, stats, sparsity), X)
    err_magnitude = reconstruction_error(W, pruned(Magnitude(Magnitude.Options(), UNSTRUCTURED), W, stats, sparsity), X)
    assert err_sparsegpt < err_wanda < err_magnitude


@pytest.mark.parametrize("pruner_class", [SparseGPT, Wanda, Magnitude])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_unstructured_sparsity_is_exact(pruner_class, sparsity):
    W, _, stats = correlated_layer()
    weight = pruned(pruner_class(pruner_class.Options(), UNSTRUCTURED), W, stats, sparsity)
    if pruner_class is Wanda:  # Wanda's comparison group is the output row: int(n * s), as the reference
        assert ((weight == 0).sum(1) == int(W.shape[1] * sparsity)).all()
    elif pruner_class is SparseGPT:  # the reference's `<= sorted[int(n * s)]` per block of 128 columns
        rows, cols = W.shape
        blocks = [min(128, cols - start) for start in range(0, cols, 128)]
        assert (weight == 0).sum().item() == sum(int(rows * width * sparsity) + 1 for width in blocks)
    else:
        assert (weight == 0).sum().item() == int(W.numel() * sparsity)


@pytest.mark.parametrize("pruner_class", [SparseGPT, Wanda, Magnitude])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_masks_are_valid(pruner_class, pattern):
    nm = SparsityPattern.parse(pattern)
    W, _, stats = correlated_layer()
    weight = pruned(pruner_class(pruner_class.Options(), nm), W, stats, nm.implied_sparsity)
    nonzeros = (weight != 0).reshape(W.shape[0], -1, nm.m).sum(-1)
    assert (nonzeros == nm.n).all()


def test_sparsegpt_updates_kept_weights_and_zeroes_dead_inputs():
    W, X, _ = correlated_layer()
    X[:, 5] = 0  # an input that is never active
    stats = InputStats(ntokens=X.shape[0], x_sum=X.sum(0), sq_sum=(X * X).sum(0), xtx=X.T @ X)
    weight = pruned(SparseGPT(SparseGPT.Options(), UNSTRUCTURED), W, stats, 0.5)
    assert (weight[:, 5] == 0).all()
    kept = weight != 0
    assert not torch.allclose(weight[kept], W[kept])  # the OBS update moved the surviving weights


def test_sparsegpt_rejects_blocksize_not_multiple_of_m():
    pattern = SparsityPattern.parse("2:4")
    with pytest.raises(ConfigError, match="method.blocksize=6 must be a multiple of M=4"):
        SparseGPT(SparseGPT.Options(blocksize=6), pattern).check(pattern)


# ----------------------------------------------------------------------------- the registry


def test_every_component_module_is_in_the_catalog_and_registers_a_component():
    listed = {module.__name__ for module in catalog.COMPONENTS}
    registered = {cls.__module__ for cls in [*registry.ALLOCATORS.values(), *registry.PRUNERS.values()]}
    for package in (allocators, pruners):
        modules = {info.name for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}.")}
        assert modules <= listed, f"add to methods.catalog.COMPONENTS: {sorted(modules - listed)}"
        assert modules <= registered, f"registers nothing: {sorted(modules - registered)}"


@pytest.mark.parametrize("lookup, key, known", [(registry.pruner, "method.pruner", registry.PRUNERS),
                                                (registry.allocator, "method.allocator", registry.ALLOCATORS)])
def test_an_unknown_component_names_the_key_the_value_and_what_is_available(lookup, key, known):
    with pytest.raises(ConfigError) as error:
        lookup("obs")
    assert str(error.value) == f"{key}='obs' is not known; available: {', '.join(sorted(known))}"
    with pytest.raises(ConfigError, match="method.fitness_pruner='obs' is not known"):
        registry.pruner("obs", "method.fitness_pruner")


def test_a_name_cannot_be_registered_by_two_classes():
    with pytest.raises(ValueError, match="pruner 'wanda' is registered twice: methods.pruners.wanda.Wanda and tests.test_pruners.*Other"):
        @registry.register_pruner("wanda")
        class Other(LinearPruner):
            def prune_linear(self, weight, stats, sparsity):
                pass
    assert registry.PRUNERS["wanda"] is Wanda


def test_a_component_without_its_required_hook_cannot_be_built():
    class Forgetful(LinearPruner):  # no prune_linear
        pass

    with pytest.raises(TypeError, match="prune_linear"):
        Forgetful(None, UNSTRUCTURED)


@pytest.mark.parametrize("name", sorted(name for name, cls in registry.PRUNERS.items()
                                        if issubclass(cls, LinearPruner) and cls.prunes))
def test_changes_kept_says_whether_a_pruner_changes_the_weights_it_keeps(name):
    """A resume saves a block as the mask of its nonzeros when the kept weights are the dense ones
    (bench/resume.py), and the plan sizes the resume state by this flag."""
    W, _, stats = correlated_layer()
    cls = registry.PRUNERS[name]
    weight = pruned(cls(cls.Options(), SparsityPattern.parse("unstructured")), W, stats, 0.5)
    kept = weight != 0
    assert (kept.sum() < W.numel()) and torch.equal(weight[kept], W[kept]) != cls.changes_kept
