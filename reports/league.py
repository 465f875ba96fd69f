"""A search league read as paired comparisons: league.md / league.csv / league_cost.csv.

Seeds pair: the same seed draws the same calibration samples for every arm, so the arms of one model,
sparsity and pruner are compared seed by seed, not by overlapping means. The reference arm is the LLM
search (`operators` and `init` both `llm`); without one, the first search arm of the sweep. Each
reference is compared with every other arm that prunes with the same pruner (a Wanda arm against a
SparseGPT arm would measure the pruner, not the search).

The verdict comes from the exact sign test, through its distribution-free interval for the median paired
difference (order statistics of the differences): "better" or "worse" when the interval lies on one side
of zero, else "no difference". The interval reaches 95% only from 6 pairs on (0.5^5 = 0.03 > 0.025), so
fewer seeds say "no difference (n=k)" whatever the differences: a reader sees that the league was too
small, not that the arms tie. Beside it, each arm's search cost: wall time, distinct fitness
evaluations, tokens scored, LLM calls and tokens generated (`allocator.search`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np
import pandas as pd
from scipy.stats import binom

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.core.metrics import metric
from bench.core.records import Result
from reports.frame import row_labels
from reports.table import Table, fmt

LEVEL = 0.95


@dataclass
class Interval:
    low: float
    high: float
    coverage: float  # the exact coverage of the order-statistic interval, >= LEVEL


def median_interval(diffs: np.ndarray, level: float = LEVEL) -> Optional[Interval]:
    """The sign test's interval for the median of `diffs`: [d(k+1), d(n-k)] with the largest k whose
    coverage 1 - 2 P(Bin(n, 1/2) <= k) is still >= `level`; None when even k = 0 falls short."""
    n = len(diffs)
    ks = [k for k in range(n // 2) if 1 - 2 * binom.cdf(k, n, 0.5) >= level]
    if not ks:
        return None
    k, ordered = ks[-1], np.sort(diffs)
    return Interval(float(ordered[k]), float(ordered[n - 1 - k]), float(1 - 2 * binom.cdf(k, n, 0.5)))


def sign_p(diffs: np.ndarray) -> float:
    """Two-sided exact sign test; ties carry no sign and are dropped."""
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    n = wins + losses
    return 1.0 if n == 0 else float(min(1.0, 2 * binom.cdf(min(wins, losses), n, 0.5)))


def verdict(diffs: np.ndarray, lower_is_better: bool) -> str:
    """One word for `diffs` = reference - other: whether the reference is better, worse or neither."""
    interval = median_interval(diffs)
    if interval is None:
        return f"no difference (n={len(diffs)})"
    if interval.high < 0 or interval.low > 0:
        return "better" if (interval.high < 0) == lower_is_better else "worse"
    return "no difference"


def _minimum_pairs(level: float = LEVEL) -> int:
    n = 1
    while median_interval(np.zeros(n), level) is None:
        n += 1
    return n


# --- the cells -------------------------------------------------------------------------------------

def cells_frame(records: list[Result]) -> pd.DataFrame:
    """One row per ok pruned cell: its arm (the results table's row label), pruner, seed, whether it
    searched, and what the search spent."""
    labels = row_labels(records)
    rows = []
    for result in records:
        if not result.ok or result.cell.baseline:
            continue
        method = result.config.get("method", {})
        search = result.allocator.get("search") or {}
        calls = search.get("calls", [])
        timings = result.timings
        # a search another cell ran, taken from the cache: the arm still paid what it cost where it ran
        shared_s = search["seconds"]["total"] if "search" in result.cache.get("hits", []) else 0.0
        rows.append({
            "model": result.cell.model, "sparsity": result.cell.sparsity, "arm": labels[id(result)],
            "pruner": method.get("pruner", result.cell.method), "seed": result.cell.seed, "search": bool(search),
            "llm_arm": search.get("operators") == "llm" and search.get("init") == "llm",
            "operators": search.get("operators"), "init": search.get("init"),
            # how well a loss-estimate schedule ranked the pruner's realised per-layer error (its record)
            "estimate_fit": (result.allocator.get("realised_fit") or {}).get("spearman", np.nan),
            "allocation_s": sum(timings.get(s, 0.0) for s in ("allocate_observe", "allocate")) + shared_s,
            "cell_s": timings.get("total", np.nan) + shared_s,
            "evaluations": search.get("evaluations", np.nan), "tokens_scored": search.get("tokens_scored", np.nan),
            "llm_calls": len(calls) if search else np.nan,
            # a record written before the search counted them has none: unknown, not zero
            "llm_tokens": np.nan if search.get("llm_tokens") is None else search["llm_tokens"],
            "config_hash": result.config_hash})
    return pd.DataFrame(rows)


def is_league(cells: pd.DataFrame) -> bool:
    """A sweep with at least one search arm run on >= 2 seeds."""
    if cells.empty:
        return False
    searched = cells[cells["search"]]
    return bool(searched.groupby(["model", "sparsity", "arm"])["seed"].nunique().ge(2).any())


def paired_frame(cells: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, sparsity, metric, reference arm, other arm): the seeds both ran, the reference's
    wins, the mean and median of reference - other, the sign test's interval and p, and the verdict."""
    order = long.groupby("row", sort=False)["order"].min().to_dict()
    values = _values(cells, long)
    rows = []
    for (model, sparsity, pruner), group in cells.groupby(["model", "sparsity", "pruner"], sort=False):
        arms = sorted(group["arm"].unique(), key=lambda arm: order.get(arm, 1 << 30))
        searched = [a for a in arms if group.loc[group["arm"] == a, "search"].any()]
        references = [a for a in searched if group.loc[group["arm"] == a, "llm_arm"].all()] or searched[:1]
        here = values[(values["model"] == model) & (values["sparsity"] == sparsity) & (values["pruner"] == pruner)]
        for name in here["metric"].unique():
            table = here[here["metric"] == name].pivot_table(index="seed", columns="arm", values="value")
            lower = metric(name).lower_is_better
            for reference in references:
                for other in (a for a in arms if a != reference and a in table and reference in table):
                    both = table[[reference, other]].dropna()
                    if len(both):
                        rows.append({"model": model, "sparsity": sparsity, "pruner": pruner, "metric": name,
                                     "arm": reference, "vs": other, **_paired(both[reference], both[other], lower)})
    return pd.DataFrame(rows)


def _values(cells: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """The results-table metrics of `cells`, one row per cell and metric, with the cell's arm and pruner."""
    measured = long.dropna(subset=["metric"])
    measured = measured[measured["config_hash"].isin(cells["config_hash"])
                        & measured["metric"].map(lambda name: metric(name).table == "results")]
    return measured.merge(cells[["config_hash", "arm", "pruner"]], on="config_hash")


def _paired(first: pd.Series, second: pd.Series, lower: bool) -> dict:
    """The paired statistics of first - second over the seeds (their shared index)."""
    diffs = (first - second).to_numpy()
    interval = median_interval(diffs)
    better = diffs < 0 if lower else diffs > 0
    return {"n": len(diffs), "seeds": ",".join(map(str, first.index)), "diffs": ";".join(f"{d:.6g}" for d in diffs),
            "wins": int(better.sum()), "mean_diff": float(diffs.mean()), "median_diff": float(np.median(diffs)),
            "low": np.nan if interval is None else interval.low,
            "high": np.nan if interval is None else interval.high,
            "coverage": np.nan if interval is None else interval.coverage,
            "p_sign": sign_p(diffs), "verdict": verdict(diffs, lower)}


# (effect, held fixed, the LLM side's (init, operators), the GA side's): each changes one factor of the 2x2
FACTORS = [("operators", "init llm", ("llm", "llm"), ("llm", "ga")),
           ("operators", "init ga", ("ga", "llm"), ("ga", "ga")),
           ("prior", "operators llm", ("llm", "llm"), ("ga", "llm")),
           ("prior", "operators ga", ("llm", "ga"), ("ga", "ga"))]


def factor_frame(cells: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """Where the search arms cross the LLM's and the GA's initial population with their operators, each
    factor's paired effect with the other held fixed: LLM side - GA side per seed, so "better" says the
    LLM's prior (or operators) helped. One row per (model, sparsity, pruner, metric, effect, held fixed)."""
    searched = cells[cells["search"] & cells["init"].isin(["llm", "ga"]) & cells["operators"].isin(["llm", "ga"])]
    values = _values(searched, long).merge(searched[["config_hash", "init", "operators"]], on="config_hash")
    rows = []
    for (model, sparsity, pruner, name), group in values.groupby(["model", "sparsity", "pruner", "metric"],
                                                                 sort=False):
        table = group.pivot_table(index="seed", columns=["init", "operators"], values="value")
        arms = group.groupby(["init", "operators"])["arm"].first()
        for effect, fixed, llm_side, ga_side in FACTORS:
            if llm_side not in table or ga_side not in table:
                continue
            both = table[[llm_side, ga_side]].dropna()
            if len(both):
                rows.append({"model": model, "sparsity": sparsity, "pruner": pruner, "metric": name, "effect": effect,
                             "fixed": fixed, "llm_side": arms[llm_side], "ga_side": arms[ga_side],
                             **_paired(both[llm_side], both[ga_side], metric(name).lower_is_better)})
    return pd.DataFrame(rows)


def cost_frame(cells: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """Per arm (model, sparsity, pruner): the mean over seeds of each quality metric and of the search's
    costs."""
    order = long.groupby("row", sort=False)["order"].min().to_dict()
    quality = long.dropna(subset=["metric"])
    quality = quality[quality["config_hash"].isin(cells["config_hash"])
                      & quality["metric"].map(lambda name: metric(name).table == "results")]
    quality = quality.merge(cells[["config_hash", "arm"]], on="config_hash").pivot_table(
        index=["model", "sparsity", "arm"], columns="metric", values="value", sort=False)
    keys = ["model", "sparsity", "pruner", "arm"]
    costs = cells.groupby(keys, sort=False).agg(
        seeds=("seed", "nunique"), allocation_s=("allocation_s", "mean"), cell_s=("cell_s", "mean"),
        evaluations=("evaluations", "mean"), tokens_scored=("tokens_scored", "mean"),
        llm_calls=("llm_calls", "mean"), llm_tokens=("llm_tokens", "mean"),
        estimate_fit=("estimate_fit", "mean")).reset_index()
    costs = costs.join(quality, on=["model", "sparsity", "arm"])
    costs["order"] = costs["arm"].map(lambda arm: order.get(arm, 1 << 30))
    return costs.sort_values(["model", "sparsity", "pruner", "order"]).drop(columns="order").reset_index(drop=True)


# --- tables ----------------------------------------------------------------------------------------

def _number(value: float, pattern: str = "{:.0f}") -> str:
    return "-" if pd.isna(value) else pattern.format(value)


def _signed(value: float, name: str) -> str:
    return ("+" if value > 0 else "") + fmt(value, name)


def paired_table(pairs: pd.DataFrame) -> Table:
    rows = []
    for p in pairs.itertuples():
        interval = "-" if pd.isna(p.low) else f"[{_signed(p.low, p.metric)}, {_signed(p.high, p.metric)}]"
        rows.append([p.model, f"{p.sparsity:.0%}", p.metric, p.arm, p.vs, str(p.n), f"{p.wins}/{p.n}",
                     _signed(p.mean_diff, p.metric), _signed(p.median_diff, p.metric), interval,
                     f"{p.p_sign:.3f}", p.verdict])
    notes = [
        "difference = arm - vs, per seed (the same seed: the same calibration draw); wins: seeds where the arm is "
        "better",
        f"interval: the exact sign test's distribution-free interval for the median difference, coverage >= "
        f"{LEVEL:.0%}; p: two-sided exact sign test, ties dropped",
        f"verdict: better / worse when the interval excludes 0, else no difference; below {_minimum_pairs()} "
        f"seeds no interval reaches {LEVEL:.0%}, so the verdict is no difference (n=seeds), whatever the wins",
        "the arm: the LLM search (operators and init llm), else the first search arm; compared only with arms "
        "of the same pruner"]
    return Table("Paired differences between arms", ["model", "sparsity", "metric", "arm", "vs", "n", "wins",
                                                      "mean diff", "median diff", "interval", "p", "verdict"],
                 rows, notes, caption="Paired differences between the arms of the league",
                 label="tab:prunebench-league", index=5)


def cost_table(costs: pd.DataFrame, metrics: list[str]) -> Table:
    rows = [[c["model"], f"{c['sparsity']:.0%}", c["arm"], str(c["seeds"])]
            + [_number(c.get(m), "{:." + str(metric(m).decimals) + "f}") for m in metrics]
            + [_number(c["allocation_s"], "{:.1f}"), _number(c["cell_s"], "{:.1f}"), _number(c["evaluations"]),
               _number(c["tokens_scored"]), _number(c["llm_calls"]), _number(c["llm_tokens"]),
               _number(c["estimate_fit"], "{:+.2f}")]
            for _, c in costs.iterrows()]
    notes = ["every number: the mean over the arm's seeds; allocation time: the allocator's dense pass and search",
             "a search shared with another cell through the cache (cache hits: search) counts its own recorded "
             "time in both times",
             "evaluations: distinct fitness evaluations; tokens scored: evaluations x fitness windows x their length",
             "LLM tokens: tokens the LLM generated over the search; - where the record does not count them",
             "estimate fit: a loss-estimate schedule's Spearman correlation, over layers, between its estimated loss "
             "and the realised error of the pruner the arm uses (method.realised_pruner); near 0 or below, the "
             "schedule does not model that pruner"]
    return Table("Search cost beside quality", ["model", "sparsity", "arm", "seeds", *metrics, "allocation time (s)",
                                                "cell time (s)", "evaluations", "tokens scored", "LLM calls",
                                                "LLM tokens", "estimate fit"],
                 rows, notes, caption="Quality and search cost of every arm", label="tab:prunebench-league-cost",
                 index=3)


def factor_table(factors: pd.DataFrame) -> Table:
    rows = [[f.model, f"{f.sparsity:.0%}", f.metric, f.effect, f.fixed, f.llm_side, f.ga_side, f"{f.wins}/{f.n}",
             _signed(f.mean_diff, f.metric), _signed(f.median_diff, f.metric), f"{f.p_sign:.3f}", f.verdict]
            for f in factors.itertuples()]
    notes = ["each row changes one factor of the search and holds the other: the initial population (prior) or the "
             "crossover and mutation (operators), the LLM's against the classical GA's",
             "difference = LLM side - GA side, per seed; better: the LLM's prior (or operators) gave the better "
             "schedule; verdicts and p as in the paired table"]
    return Table("Prior or operators", ["model", "sparsity", "metric", "effect", "held fixed", "LLM side", "GA side",
                                        "wins", "mean diff", "median diff", "p", "verdict"],
                 rows, notes, caption="The LLM's prior and operators, each against the GA's with the other held",
                 label="tab:prunebench-league-factors", index=5)


@dataclass
class League:
    pairs: pd.DataFrame
    costs: pd.DataFrame
    factors: pd.DataFrame
    tables: list[Table]

    @property
    def markdown(self) -> str:
        return "\n\n".join(f"## {t.title}\n\n{t.markdown}" for t in self.tables)


def league(records: list[Result], long: pd.DataFrame) -> Optional[League]:
    """The league's paired table and cost table; None when no search arm ran >= 2 seeds."""
    cells = cells_frame(records)
    if not is_league(cells):
        return None
    pairs, costs, factors = paired_frame(cells, long), cost_frame(cells, long), factor_frame(cells, long)
    metrics = list(dict.fromkeys(pairs["metric"])) if not pairs.empty else []
    tables = [paired_table(pairs), *([factor_table(factors)] if not factors.empty else []), cost_table(costs, metrics)]
    return League(pairs, costs, factors, tables)


def plot_pairs(pairs: pd.DataFrame, out_stem: Path) -> list[Path]:
    """One panel per (model, sparsity, metric, arm): each seed's difference to every other arm as a dot,
    the sign test's interval as a bar where the seeds allow one, the verdict beside it."""
    panels = list(pairs.groupby(["model", "sparsity", "metric", "arm"], sort=False))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.5 + 0.45 * max(len(g) for _, g in panels) * len(panels)),
                             squeeze=False)
    for ax, ((model, sparsity, name, arm), group) in zip(axes[:, 0], panels):
        for y, p in enumerate(group.itertuples()):
            diffs = [float(d) for d in p.diffs.split(";")]
            ax.plot(diffs, [y] * len(diffs), "o", color="C0", alpha=0.7)
            if not pd.isna(p.low):
                ax.plot([p.low, p.high], [y, y], "-", color="C0", linewidth=3, alpha=0.4)
            ax.annotate(p.verdict, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
        ax.axvline(0, color="grey", linewidth=1, linestyle=":")
        ax.set_yticks(range(len(group)), [f"vs {vs}" for vs in group["vs"]], fontsize=8)
        ax.set_ylim(len(group) - 0.4, -0.6)  # the table's order, top down
        better = "lower" if metric(name).lower_is_better else "higher"
        ax.set_title(f"{model} {sparsity:.0%}: {arm}", fontsize=9)
        ax.set_xlabel(f"{name}: arm - vs per seed ({better} is better for the arm)", fontsize=8)
    fig.tight_layout()
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    files = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for file in files:
        fig.savefig(file, dpi=120, bbox_inches="tight", **({} if file.suffix == ".png" else {"metadata": {"Date": None}}))
    plt.close(fig)
    return files


def write(records: list[Result], long: pd.DataFrame, sweep_dir: Path, plots: bool = False) -> list[Path]:
    """league.md, league.csv (one row per pair), league_cost.csv and, where the arms cross the LLM's and the
    GA's prior and operators, league_factors.csv into `sweep_dir`, with `plots` the
    paired differences as plots/league.png|svg; nothing when the sweep is no league."""
    found = league(records, long)
    if found is None:
        return []
    paths = {sweep_dir / "league.md": found.markdown + "\n", sweep_dir / "league.csv": found.pairs.to_csv(index=False),
             sweep_dir / "league_cost.csv": found.costs.to_csv(index=False)}
    if not found.factors.empty:
        paths[sweep_dir / "league_factors.csv"] = found.factors.to_csv(index=False)
    for path, text in paths.items():
        path.write_text(text)
    # the 2x2's effects are panels of their own: the LLM's side of a factor against the GA's
    effects = found.factors.assign(arm=lambda f: "the LLM's " + f["effect"],
                                   vs=lambda f: "the GA's (" + f["fixed"] + ")") if not found.factors.empty else None
    shown = pd.concat([found.pairs, effects], ignore_index=True)
    images = plot_pairs(shown, sweep_dir / "plots" / "league") if plots and not shown.empty else []
    return list(paths) + images
