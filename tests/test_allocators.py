"""Non-uniform allocators: loss_estimate (Zhang et al. 2024) and OWL (Yin et al. 2023)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.cell import run_cell
from bench.core.vocab import ConfigError, SparsityPattern
from bench.core.engine import InputStats
from bench.core.records import CellKey, Result
from reports.plots import plot_layer_schedules
from methods.allocators.loss_estimate import LossEstimate, kmeans_1d, spearman
from methods.allocators.owl import OWL
from methods.pruners.sparsegpt import sparsegpt
from tests.conftest import TINY


def _loss_estimate(losses: dict[str, list[float]], **options) -> LossEstimate:
    allocator = LossEstimate(LossEstimate.Options(**options))
    allocator.losses = {name: np.array(values) for name, values in losses.items()}
    return allocator


def _random_layers(n: int, levels: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = {f"l{i}": int(rng.integers(1, 50)) * 4096 for i in range(n)}
    base = np.exp(rng.normal(0, 3, n))
    losses = {name: list(base[i] * np.linspace(1, 9, levels)) for i, name in enumerate(sizes)}
    return sizes, losses


@pytest.mark.parametrize("target", [0.5, 0.63, 0.7, 0.8, 0.87, 0.9])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_schedule_mean_is_target_and_monotone_in_loss(target, k):
    sizes, losses = _random_layers(40, 5, seed=k)
    allocator = _loss_estimate(losses, k=k, step=0.1)
    rates = allocator.allocate(sizes, target)
    weights = np.array(list(sizes.values()), dtype=float)
    mean = float((np.array([rates[n] for n in sizes]) * weights).sum() / weights.sum())
    assert mean == pytest.approx(target, abs=1e-9)
    assert all(0.5 - 1e-12 <= r <= 0.9 + 1e-12 for r in rates.values())
    nearest = int(np.argmin([abs(level - target) for level in allocator.levels]))
    for a in sizes:
        for b in sizes:
            if losses[a][nearest] > losses[b][nearest]:
                assert rates[a] <= rates[b] + 1e-12, (a, b)
    assert len({round(r, 12) for r in rates.values()}) <= k


def test_schedule_spreads_clusters_by_step():
    sizes = {"a": 100, "b": 100, "c": 100}
    losses = {"a": [1e-6, 1e-6], "b": [1e-3, 1e-3], "c": [1.0, 1.0]}
    rates = _loss_estimate(losses, levels=[0.5, 0.9], k=3, step=0.05).allocate(sizes, 0.7)
    assert rates["a"] == pytest.approx(0.75) and rates["b"] == pytest.approx(0.7)
    assert rates["c"] == pytest.approx(0.65)


def test_kmeans_1d_finds_separated_groups_in_order():
    x = np.array([10.0, 0.1, 5.0, 0.0, 10.2, 5.1, 9.9])
    assert kmeans_1d(x, 3).tolist() == [2, 0, 1, 0, 2, 1, 2]
    assert kmeans_1d(np.ones(4), 3).tolist() == [0, 0, 0, 0]


def test_obs_estimate_grows_with_sparsity_and_exact_error_is_output_error():
    torch.manual_seed(0)
    X = torch.randn(256, 32) @ torch.randn(32, 32)  # correlated inputs, tokens x features
    linear = torch.nn.Linear(32, 16, bias=False)
    stats = InputStats(ntokens=256, x_sum=X.sum(0), sq_sum=(X * X).sum(0), xtx=X.T @ X)
    view = SimpleNamespace(linears={"lin": linear}, stats={"lin": stats})
    levels = [0.2, 0.5, 0.8]
    cheap = LossEstimate(LossEstimate.Options(levels=levels, loss="absolute"))
    cheap.observe_block(view)
    assert np.all(np.diff(cheap.losses["lin"]) > 0)
    exact = LossEstimate(LossEstimate.Options(levels=levels, error="exact", loss="absolute", percdamp=0.0))
    exact.observe_block(view)
    W = linear.weight.detach()
    pruned = sparsegpt(W, stats.hessian(), 0.5, SparsityPattern("unstructured"), percdamp=0.0)
    output_error = float((((W - pruned) @ X.T) ** 2).sum() / 256)
    assert exact.losses["lin"][1] == pytest.approx(output_error, rel=1e-3)


def test_owl_fewer_outliers_more_sparsity_and_mean_kept():
    allocator = OWL(OWL.Options(m=5.0, lam=0.08))
    allocator.ratios = {0: 0.01, 1: 0.05, 2: 0.03}
    allocator.block_of = {"b0.q": 0, "b0.fc": 0, "b1.q": 1, "b1.fc": 1, "b2.q": 2, "b2.fc": 2}
    sizes = {"b0.q": 10, "b0.fc": 30, "b1.q": 10, "b1.fc": 30, "b2.q": 10, "b2.fc": 30}
    rates = allocator.allocate(sizes, 0.7)
    mean = sum(rates[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert rates["b1.q"] < rates["b2.q"] < rates["b0.q"]
    assert rates["b0.q"] == rates["b0.fc"]
    assert rates["b0.q"] - rates["b1.q"] == pytest.approx(0.16)  # the full 2*lambda spread


def test_owl_outlier_ratio_counts_scores_above_m_times_mean():
    linear = torch.nn.Linear(4, 1, bias=False)
    linear.weight.data = torch.tensor([[1.0, 1.0, 1.0, 100.0]])
    stats = InputStats(ntokens=1, x_sum=torch.zeros(4), sq_sum=torch.ones(4), xtx=None)
    allocator = OWL(OWL.Options(m=2.0))
    allocator.observe_block(SimpleNamespace(index=0, linears={"l": linear}, stats={"l": stats}))
    assert allocator.ratios[0] == pytest.approx(0.25)


@pytest.mark.parametrize("overrides, message", [
    (["method=loss_estimate", "sparsity=0.95"], "cannot be reached"),
    (["method=loss_estimate", "sparsity=0.4"], "cannot be reached"),
    (["method=loss_estimate", "sparsity=0.7", "method.k=15"], "larger than the number of prunable layers"),
    (["method=loss_estimate", "sparsity=0.7", "method.levels=[0.8,0.6]"], "method.levels"),
    (["method=loss_estimate", "sparsity=0.7", "method.error=approx"], "method.error"),
    (["method=loss_estimate", "sparsity=0.5", "method.sparsity_type=2:4"], "unstructured"),
    (["method=owl_wanda", "sparsity=0.9"], "method.lam"),
    (["method=loss_estimate", "sparsity=0.7", "method.wbits=5"], "method.wbits=5"),
])
def test_bad_schedule_configs_fail_at_config_time(overrides, message, make_config):
    with pytest.raises(ConfigError, match=message):
        make_config("model=llama-tiny", *overrides)  # llama-tiny: 2 blocks x 7 linears = 14 layers


@pytest.mark.parametrize("model", ["opt-tiny", "bloom-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", ["loss_estimate", "owl_wanda", "owl_sparsegpt"])
def test_schedules_run_end_to_end_and_hit_target(model, method, make_config, tmp_path):
    cfg, resolved = make_config(f"model={model}", f"method={method}", "sparsity=0.7", "method.k=2"
                                if method == "loss_estimate" else "method.lam=0.08", *TINY)
    run_cell(cfg, resolved, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "ok", saved["error"]
    sparsity = saved["sparsity"]
    # Wanda removes int(cols x rate) weights per row (the reference's count): up to one weight per row of
    # 64 inputs short of the rate, never more
    if method == "owl_wanda":
        assert 0.7 - 1 / 64 < sparsity["measured"] <= 0.7 + 1e-9
    else:
        assert abs(sparsity["measured"] - 0.7) < 0.001
    assert len(set(sparsity["allocated"].values())) > 1  # really non-uniform
    if method == "loss_estimate":  # the preset ranks its estimate against its own pruner's realised error
        fit = saved["allocator"]["realised_fit"]
        assert fit["pruner"] == "sparsegpt" and fit["level"] == 0.7 and fit["layers"] == len(sparsity["allocated"])
        assert -1 <= fit["spearman"] <= 1
    for name, rate in sparsity["allocated"].items():
        if method == "owl_wanda":  # a whole number of weights per row of 64 inputs, rounded down
            assert rate - 1 / 64 < sparsity["per_layer"][name] <= rate + 1e-9
        else:
            assert abs(sparsity["per_layer"][name] - rate) < 0.01


def test_schedule_plot_writes_png_and_svg(tmp_path):
    def result(method, rates, status="ok"):
        allocated = {f"model.layers.{i // 2}.{'q' if i % 2 else 'fc'}": r for i, r in enumerate(rates)}
        return Result(status, method, CellKey("m", method, 0.7),
                      sparsity={"target": 0.7, "measured": 0.7, "allocated": allocated} if status == "ok" else {})

    written = plot_layer_schedules([result("uniform", [0.7] * 4), result("loss_estimate", [0.6, 0.8, 0.65, 0.75]),
                                    result("wanda", [], "failed")], tmp_path / "schedules")
    assert [p.suffix for p in written] == [".png", ".svg", ".pdf"]
    assert all(p.stat().st_size > 1000 for p in written)
    with pytest.raises(ValueError, match="no finished result"):
        plot_layer_schedules([result("wanda", [], "failed")], tmp_path / "none")


def test_schedule_plot_shows_every_seed_not_only_the_first(tmp_path):
    def result(seed, rates):
        allocated = {f"model.layers.{i}.fc": r for i, r in enumerate(rates)}
        return Result("ok", "self_pruner", CellKey("m", "self_pruner", 0.7, seed=seed),
                      sparsity={"target": 0.7, "measured": 0.7, "allocated": allocated})

    first = result(0, [0.6, 0.8, 0.7, 0.7])
    alone = plot_layer_schedules([first], tmp_path / "alone")[0].read_bytes()
    same = plot_layer_schedules([first, result(1, [0.6, 0.8, 0.7, 0.7])], tmp_path / "same")[0].read_bytes()
    other = plot_layer_schedules([first, result(1, [0.8, 0.6, 0.7, 0.7])], tmp_path / "other")[0].read_bytes()
    assert len({alone, same, other}) == 3  # the second seed changes the figure, and its own schedule shows


def test_relative_loss_ignores_the_scale_of_a_layer():
    torch.manual_seed(0)
    X = torch.randn(128, 16)
    stats = InputStats(ntokens=128, x_sum=X.sum(0), sq_sum=(X * X).sum(0), xtx=X.T @ X)
    small, large = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
    large.weight.data = small.weight.data * 10
    view = SimpleNamespace(linears={"small": small, "large": large}, stats={"small": stats, "large": stats})
    for loss, ratio in (("absolute", 100.0), ("relative", 1.0)):
        allocator = LossEstimate(LossEstimate.Options(levels=[0.5], loss=loss))
        allocator.observe_block(view)
        assert allocator.losses["large"][0] == pytest.approx(ratio * allocator.losses["small"][0], rel=1e-4)


def _layers_of_unequal_difficulty(n: int = 8):
    """Layers whose inputs differ in scale spread and in one shared (correlated) component: SparseGPT's
    update exploits the correlation, pruners without an update do not, so their errors rank differently."""
    torch.manual_seed(0)
    linears, stats = {}, {}
    for i in range(n):
        X = torch.randn(256, 32) * torch.rand(32) ** (i % 4) + (i % 3) * torch.randn(256, 1)
        linears[f"l{i}"] = torch.nn.Linear(32, 16, bias=False)
        stats[f"l{i}"] = InputStats(ntokens=256, x_sum=X.sum(0), sq_sum=(X * X).sum(0), xtx=X.T @ X)
    return SimpleNamespace(linears=linears, stats=stats), {name: 512 for name in linears}


def test_realised_fit_ranks_the_estimate_against_the_error_of_the_pruner_used():
    view, sizes = _layers_of_unequal_difficulty()
    # the exact estimate is SparseGPT's own error: against SparseGPT it ranks every layer right
    exact = LossEstimate(LossEstimate.Options(error="exact", realised_pruner="sparsegpt"))
    exact.observe_block(view)
    exact.allocate(sizes, 0.7)
    assert exact.finish()["realised_fit"] == {"pruner": "sparsegpt", "level": 0.7, "layers": 8,
                                              "spearman": pytest.approx(1.0)}
    # against Wanda (no update) the same estimate ranks the layers worse: the schedule does not fit it
    other = LossEstimate(LossEstimate.Options(error="exact", realised_pruner="wanda"))
    other.observe_block(view)
    other.allocate(sizes, 0.7)
    assert other.finish()["realised_fit"]["spearman"] < 0.5
    # restored from the cross-cell cache, the fit is recorded again
    restored = LossEstimate(LossEstimate.Options(error="exact", realised_pruner="wanda"))
    restored.load_dense_state(other.dense_state())
    restored.allocate(sizes, 0.7)
    assert restored.finish() == other.finish()
    plain = LossEstimate(LossEstimate.Options())
    plain.observe_block(view)
    plain.allocate(sizes, 0.7)
    assert plain.finish() == {}


def test_spearman_ranks_with_ties():
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert spearman(np.ones(3), np.array([1.0, 2.0, 3.0])) == 0.0


@pytest.mark.parametrize("override, match", [
    ("method.realised_pruner=obs", "method.realised_pruner='obs' is not known"),
    ("method.realised_pruner=wanda_sp", r"method.realised_pruner='wanda_sp' is out of range; allowed: a pruner of single"),
])
def test_bad_realised_pruner_fails_at_config_time(make_config, override, match):
    with pytest.raises(ConfigError, match=match):
        make_config("model=llama-tiny", *TINY, "method=loss_estimate", override)
