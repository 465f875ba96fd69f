"""The league report (reports/league.py): paired sign-test verdicts that say "better" only when the seeds
allow it, costs beside quality, and the whole path from run.py sweeps to league.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bench.core.records import CellKey, Result, read_results, write_result
from reports import league
from reports.__main__ import main as reports_main
from reports.frame import long_frame
from tests.conftest import ROOT, TINY, run_py

DISPLAY = {"self_pruner": "Self-Pruner (LLM, Wanda)", "self_pruner_ga": "Self-Pruner (GA, Wanda)",
           "self_pruner_ga_llm_init": "GA ops, LLM init", "self_pruner_llm_ga_init": "LLM ops, GA init",
           "wanda": "Wanda", "sparsegpt": "SparseGPT", "loss_estimate_wanda": "Loss estimate (Wanda)"}
# the search arms' (init, operators)
SEARCHES = {"self_pruner": ("llm", "llm"), "self_pruner_ga": ("ga", "ga"), "self_pruner_ga_llm_init": ("llm", "ga"),
            "self_pruner_llm_ga_init": ("ga", "llm")}


def _record(method: str, seed: int, ppl: float, pruner: str = "wanda") -> Result:
    search = None
    if method in SEARCHES:
        init, operators = SEARCHES[method]
        asks = (init == "llm") * 4 + (operators == "llm") * 12
        search = {"operators": operators, "init": init, "evaluations": 13, "tokens_scored": 1664,
                  "llm_tokens": 25 * asks, "calls": [{}] * asks}
    allocator = {"search": search} if search else {}
    if method == "loss_estimate_wanda":
        allocator = {"realised_fit": {"pruner": "wanda", "level": 0.7, "layers": 8, "spearman": -0.25 + seed / 10}}
    return Result(status="ok", config_hash=f"{method}-{seed}",
                  cell=CellKey("llama-tiny", method, 0.7, seed=seed, display=DISPLAY[method]),
                  config={"method": {"name": method, "pruner": pruner}, "seed": seed},
                  metrics={"ppl": {"pydoc": ppl}}, allocator=allocator,
                  timings={"allocate": 4.0 if search else 0.0, "total": 5.0})


def _league(records: list[Result]) -> league.League:
    found = league.league(records, long_frame(records))
    assert found is not None
    return found


def _pair(found: league.League, vs: str) -> pd.Series:
    rows = found.pairs[found.pairs["vs"] == vs]
    assert len(rows) == 1
    return rows.iloc[0]


@pytest.mark.parametrize("seeds, word", [(2, "no difference (n=2)"), (5, "no difference (n=5)"), (6, "better")])
def test_better_on_every_seed_is_better_only_when_the_seeds_can_show_it(seeds, word):
    # the LLM arm is lower (better) on every seed; Wanda is the paired reference point
    records = [r for s in range(seeds) for r in (_record("self_pruner", s, 100.0 + s),
                                                 _record("wanda", s, 103.0 + 2 * s))]
    pair = _pair(_league(records), "Wanda")
    assert pair["arm"] == "Self-Pruner (LLM, Wanda)" and pair["n"] == seeds and pair["wins"] == seeds
    assert pair["verdict"] == word
    assert pair["p_sign"] == pytest.approx(2 * 0.5 ** seeds)
    if seeds < 6:
        assert np.isnan(pair["low"])  # no interval at 95% exists, so none is shown
    else:
        # k = 0: [min, max] of the differences, coverage 1 - 2 / 64
        assert (pair["low"], pair["high"]) == (-3.0 - 5, -3.0)
        assert pair["coverage"] == pytest.approx(1 - 2 / 64)


def test_worse_mixed_and_tied_seeds():
    worse = [r for s in range(6) for r in (_record("self_pruner", s, 110.0 + s), _record("wanda", s, 100.0))]
    assert _pair(_league(worse), "Wanda")["verdict"] == "worse"
    # better on 6 of 8 seeds: the sign test's p is 0.29, the interval holds 0
    mixed = [r for s in range(8) for r in (_record("self_pruner", s, 100.0 + (5 if s < 2 else -1)),
                                           _record("wanda", s, 100.0))]
    pair = _pair(_league(mixed), "Wanda")
    assert (pair["wins"], pair["verdict"]) == (6, "no difference") and pair["low"] < 0 < pair["high"]
    tied = [r for s in range(6) for r in (_record("self_pruner", s, 100.0), _record("wanda", s, 100.0))]
    pair = _pair(_league(tied), "Wanda")
    assert (pair["wins"], pair["p_sign"], pair["verdict"]) == (0, 1.0, "no difference")


def test_interval_is_the_order_statistics_of_the_sign_test():
    diffs = np.arange(1.0, 11.0)  # n = 10: k = 1, coverage 1 - 2 * 11 / 1024
    interval = league.median_interval(diffs)
    assert (interval.low, interval.high) == (2.0, 9.0)
    assert interval.coverage == pytest.approx(1 - 22 / 1024)
    assert league.median_interval(np.ones(5)) is None


def test_arms_pair_within_their_pruner_and_costs_sit_beside_quality(tmp_path):
    records = [r for s in range(3) for r in (_record("self_pruner", s, 100.0), _record("self_pruner_ga", s, 101.0),
                                             _record("wanda", s, 102.0), _record("sparsegpt", s, 50.0, "sparsegpt"))]
    found = _league(records)
    assert set(found.pairs["vs"]) == {"Self-Pruner (GA, Wanda)", "Wanda"}  # never SparseGPT: another pruner
    costs = found.costs.set_index("arm")
    assert costs.loc["Self-Pruner (LLM, Wanda)", ["evaluations", "tokens_scored", "llm_calls", "llm_tokens"]].tolist() \
        == [13, 1664, 16, 400]
    assert costs.loc["Self-Pruner (GA, Wanda)", "llm_tokens"] == 0 and np.isnan(costs.loc["Wanda", "evaluations"])
    assert costs.loc["Wanda", "ppl/pydoc"] == 102.0
    assert "| llama-tiny | 70% | Self-Pruner (LLM, Wanda) | 3 | 100.00 |" in found.markdown
    assert found.pairs["diffs"].tolist() == ["-1;-1;-1", "-2;-2;-2"]  # per seed, for the CSV and the plot
    assert all(path.stat().st_size > 0 for path in league.plot_pairs(found.pairs, tmp_path / "league"))


def test_a_search_taken_from_the_cache_counts_its_own_time_in_the_arms_cost():
    # the SparseGPT cells of a search arm take the Wanda cells' searches from the cache (bench/cache.py): the
    # cell spent next to nothing on its search, the arm did not
    records = []
    for seed in range(2):
        records += [_record("self_pruner", seed, 100.0), _record("wanda", seed, 102.0)]
        shared = _record("self_pruner", seed, 90.0, "sparsegpt")
        shared.config_hash, shared.cache = f"shared-{seed}", {"hits": ["block0", "search"], "misses": []}
        shared.allocator["search"]["seconds"] = {"llm": 500.0, "fitness": 90.0, "total": 600.0}
        shared.timings = {"allocate": 0.5, "total": 30.0}
        records.append(shared)
    costs = _league(records).costs
    assert costs.loc[costs["pruner"] == "sparsegpt", ["allocation_s", "cell_s"]].values.tolist() == [[600.5, 630.0]]
    assert costs.loc[costs["pruner"] == "wanda", "allocation_s"].tolist() == [4.0, 0.0]  # ran their own


def test_the_2x2_of_prior_and_operators_says_which_one_the_llm_arm_owes_its_score_to(tmp_path):
    # the LLM's operators take 3 off the perplexity on every seed; its prior helps on 3 seeds of 6 and hurts on 3
    def ppl(method: str, seed: int) -> float:
        init, operators = SEARCHES[method]
        return 100.0 + seed - 3.0 * (operators == "llm") + (init == "llm") * (1.0 if seed % 2 else -1.0)
    records = [_record(m, s, ppl(m, s)) for s in range(6) for m in SEARCHES]
    records += [_record("loss_estimate_wanda", s, 104.0) for s in range(2)]
    for record in records:
        write_result(tmp_path / record.config_hash, record)
    assert reports_main(["collect", str(tmp_path), "--no-plots"]) == 0
    factors = pd.read_csv(tmp_path / "league_factors.csv")
    assert factors[["effect", "fixed", "llm_side", "ga_side", "n", "wins", "verdict"]].values.tolist() == [
        ["operators", "init llm", "Self-Pruner (LLM, Wanda)", "GA ops, LLM init", 6, 6, "better"],
        ["operators", "init ga", "LLM ops, GA init", "Self-Pruner (GA, Wanda)", 6, 6, "better"],
        ["prior", "operators llm", "Self-Pruner (LLM, Wanda)", "LLM ops, GA init", 6, 3, "no difference"],
        ["prior", "operators ga", "GA ops, LLM init", "Self-Pruner (GA, Wanda)", 6, 3, "no difference"]]
    assert factors.loc[factors["effect"] == "operators", "diffs"].tolist() == [";".join(["-3"] * 6)] * 2
    markdown = (tmp_path / "league.md").read_text()
    assert "## Prior or operators" in markdown
    assert "| llama-tiny | 70% | ppl/pydoc | operators | init llm | Self-Pruner (LLM, Wanda) | GA ops, LLM init |" \
        in markdown
    # the loss estimate's fit to the pruner it used sits beside its cost: the mean Spearman over its seeds
    costs = pd.read_csv(tmp_path / "league_cost.csv").set_index("arm")
    assert costs.loc["Loss estimate (Wanda)", "estimate_fit"] == pytest.approx(-0.2)
    assert np.isnan(costs.loc["Self-Pruner (LLM, Wanda)", "estimate_fit"])
    assert "| Loss estimate (Wanda) | 2 | 104.00 |" in markdown and "| -0.20 |" in markdown


def test_the_plot_shows_the_2x2_effects_beside_the_pairs(tmp_path, monkeypatch):
    records = [_record(m, s, 100.0 + s - 3.0 * (SEARCHES[m][1] == "llm")) for s in range(6) for m in SEARCHES]
    drawn = []
    monkeypatch.setattr(league, "plot_pairs", lambda frame, stem: drawn.append(frame) or [])
    league.write(records, long_frame(records), tmp_path, plots=True)
    panels = drawn[0].groupby("arm", sort=False)["vs"].apply(list).to_dict()
    assert panels["the LLM's operators"] == ["the GA's (init llm)", "the GA's (init ga)"]
    assert panels["the LLM's prior"] == ["the GA's (operators llm)", "the GA's (operators ga)"]
    assert drawn[0].loc[drawn[0]["arm"] == "the LLM's operators", "verdict"].tolist() == ["better"] * 2
    assert len(panels["Self-Pruner (LLM, Wanda)"]) == 3  # the paired table's rows are still drawn


def test_without_the_crossed_arms_there_is_no_2x2():
    records = [r for s in range(3) for r in (_record("self_pruner", s, 100.0), _record("self_pruner_ga", s, 101.0))]
    found = _league(records)
    assert found.factors.empty and "Prior or operators" not in found.markdown


def test_one_seed_or_no_search_is_no_league():
    assert league.league([_record("self_pruner", 0, 1.0), _record("wanda", 0, 2.0)],
                         long_frame([_record("self_pruner", 0, 1.0), _record("wanda", 0, 2.0)])) is None
    plain = [_record("wanda", s, 2.0) for s in range(3)]
    assert league.league(plain, long_frame(plain)) is None


# a minimal chat template for the byte-level tiny models, which ship none
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
SEARCH = ["method.population=3", "method.generations=1", "method.fitness_nsamples=2", "method.fitness_windows=1",
          "method.rescore_windows=1", "method.fitness_seqlen=32"]


def test_a_tiny_league_through_run_py_gets_a_verdict_per_pair_and_its_costs(tmp_path):
    # one sweep: each arm takes the method.* keys both presets have (run.py makes them ++method.*)
    extra = ["method.llm.model=llama-tiny", f"method.llm.chat_template={json.dumps(TEMPLATE)}",
             "method.llm.max_new_tokens=12"]
    run = run_py(["-m", "cache=false", "hydra/launcher=basic", "threads=1",
                  "model=llama-tiny", "sparsity=0.7", "seed=0,1", "method=self_pruner,self_pruner_ga", *TINY,
                  *SEARCH, *extra, f"hydra.sweep.dir={tmp_path / 'league'}"], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    collect = subprocess.run([sys.executable, "-m", "reports", "collect", str(tmp_path), "--no-plots"], cwd=ROOT,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert collect.returncode == 0, collect.stderr[-2000:]
    assert "league.md" in collect.stdout
    pairs = pd.read_csv(tmp_path / "league.csv")
    assert pairs[["arm", "vs", "n", "verdict"]].values.tolist() == [
        ["Self-Pruner (LLM, Wanda)", "Self-Pruner (GA, Wanda)", 2, "no difference (n=2)"]]
    costs = pd.read_csv(tmp_path / "league_cost.csv").set_index("arm")
    records = read_results(tmp_path).records
    budget = {r.allocator["search"]["budget"] for r in records}
    assert len(budget) == 1 and costs["evaluations"].tolist() == [budget.pop()] * 2  # equal effort
    llm = [r.allocator["search"] for r in records if r.cell.method == "self_pruner"]
    assert costs.loc["Self-Pruner (LLM, Wanda)", "llm_tokens"] == np.mean([s["llm_tokens"] for s in llm]) > 0
    assert costs.loc["Self-Pruner (GA, Wanda)", "llm_tokens"] == 0
    markdown = (tmp_path / "league.md").read_text()
    assert "| no difference (n=2) |" in markdown
