"""Self-Pruner: repair and parsing properties, the search loop (deterministic, counted, bounded), the LLM
backends (local with a chat template; HTTP against a loopback server) and their config-time errors."""
from __future__ import annotations

import copy
import ctypes
import json
import math
import re
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

from bench import data, models, tokenization
from bench.core.families import block_of, prunable_linears
from bench.core.records import CellKey, Result, write_result
from bench.core.vocab import ConfigError
from bench.llm import HttpChat, make_backend
from methods import catalog, lifecycle
from methods.search import fitness
from methods.search.chat import LLMConfig, LLMError, SearchFailed, parse_rates
from methods.search.evolution import Search, repair
from reports.plots import block_means, plot_layer_schedules
from reports.plots_search import plot_search
from tests.conftest import TINY

# a minimal chat template for the byte-level tiny models, which ship none
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
FAST = [*TINY, "data.calib.nsamples=6", "method.fitness_nsamples=2", "method.fitness_windows=2",
        "method.fitness_seqlen=32", "method.rescore_windows=2", "method.population=3", "method.generations=2"]


# ----------------------------------------------------------------------------- repair and parsing


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_repair_makes_the_weighted_mean_exact_and_respects_bounds(target):
    rng = np.random.default_rng(0)
    low, high = target - 0.2, target + 0.2
    for _ in range(200):
        n = int(rng.integers(2, 40))
        weights = rng.integers(1, 100, n).astype(float)
        raw = rng.normal(target, 0.5, n)  # many values far out of bounds
        fixed, clipped, adjusted = repair(raw, weights, target, low, high)
        assert abs(np.dot(fixed, weights) / weights.sum() - target) < 1e-9
        assert fixed.min() >= low and fixed.max() <= high
        assert clipped == bool((raw < low).any() or (raw > high).any())


def test_repair_leaves_a_valid_vector_alone():
    rates = np.array([0.4, 0.6, 0.5])
    fixed, clipped, adjusted = repair(rates, [1, 1, 1], 0.5, 0.3, 0.7)
    assert not clipped and not adjusted and np.array_equal(fixed, rates)


def test_repair_weights_by_parameters():
    fixed, _, adjusted = repair([0.5, 0.5], [3, 1], 0.6, 0.0, 0.99)
    assert adjusted and abs(0.75 * fixed[0] + 0.25 * fixed[1] - 0.6) < 1e-12


@pytest.mark.parametrize("text, reason", [
    ("I think layer 3 is the most important one.", "no_json"),
    ('{"rates": [0.5, 0.5, 0.', "truncated"),
    ('{"rates": [0.5, 0.5, "x"', "no_json"),
    ('{"rates": [0.5, 0.5, 0.5]}', "wrong_length"),
    ('{"rates": [0.5, NaN, 0.5, 0.5]}', "non_finite"),
    ('[0.5, Infinity, 0.5, 0.5]', "non_finite"),
    ('{"rates": ["a", "b", "c", "d"]}', "no_json"),
])
def test_parse_rejects_unusable_answers(text, reason):
    assert parse_rates(text, 4) == (None, reason)


def test_parse_finds_the_vector_inside_prose_and_converts_percentages():
    text = 'Sure! Here it is:\n```json\n{"rates": [0.4, 0.6, 0.5, 0.5]}\n```\nThe first layers [1, 2] matter.'
    assert parse_rates(text, 4) == ([0.4, 0.6, 0.5, 0.5], "ok")
    assert parse_rates("[40, 60, 50, 50]", 4) == ([0.4, 0.6, 0.5, 0.5], "percent")


# ----------------------------------------------------------------------------- the search loop


def _search(make_config, *overrides, target=0.5, make_llm=make_backend, full=False):
    """Prune llama-tiny through lifecycle.prune -> (rates, search details, {linear: numel}); with `full`, the
    allocator's whole record (warnings too) instead of its search."""
    cfg, _ = make_config("model=llama-tiny", *FAST, *overrides)
    model, samples = _tiny_model_and_samples(cfg)
    sizes = {name: linear.weight.numel() for name, linear in prunable_linears(model).items()}
    report = lifecycle.prune(model, catalog.build(cfg.method), samples, target, "cpu", make_llm=make_llm)
    return report.rates, report.details if full else report.details["search"], sizes


def test_the_search_reports_each_candidate_to_the_engines_on_step(make_config):
    """Each scored candidate is one step of the "search" pass, counted against the whole budget; the
    prunes that score candidates report nothing, so the pruning pass follows with its blocks once."""
    cfg, _ = make_config("model=llama-tiny", *FAST, "method=self_pruner_ga")
    model, samples = _tiny_model_and_samples(cfg)
    steps = []
    report = lifecycle.prune(model, catalog.build(cfg.method), samples, 0.5, "cpu",
                             on_step=lambda name, index, total, seconds: steps.append((name, index, total)))
    budget = 1 + 3 + 2 * 2
    assert report.details["search"]["candidates_total"] == budget
    blocks = cfg.model.architecture["num_hidden_layers"]
    assert steps == [("search", i, budget) for i in range(budget)] + [("prune", i, blocks) for i in range(blocks)]


def _tiny_model_and_samples(cfg):
    model, tokenizer = models.load(cfg.model)
    corpus = data.load_corpus("pydoc", "validation", None, "calib")
    return model, tokenization.calibration_samples(tokenization.tokenize(tokenizer, corpus.text), 6, 64, 0)


def test_ga_search_respects_budget_mean_and_bounds(make_config):
    rates, search, sizes = _search(make_config, "method=self_pruner_ga", "method.max_deviation=0.1")
    assert abs(sum(rates[n] * s for n, s in sizes.items()) / sum(sizes.values()) - 0.5) < 1e-9
    assert all(0.4 - 1e-12 <= r <= 0.6 + 1e-12 for r in rates.values())
    # budget: reference + population + generations x (population - elites)
    assert search["candidates_total"] == 1 + 3 + 2 * 2
    assert search["evaluations"] + search["cache_hits"] == search["candidates_total"]
    assert search["cache_hits"] >= 1  # the seeded uniform candidate repeats the reference
    best = min(c["fitness"] for c in search["candidates"])
    assert search["best"]["fitness"] == best <= search["uniform_fitness"]
    assert [h["generation"] for h in search["history"]] == [0, 1, 2]
    assert all(h["best"] <= h["mean"] for h in search["history"])
    assert {c["origin"] for c in search["candidates"]} <= {"uniform_reference", "uniform", "ga_init",
                                                         "ga_crossover", "ga_mutation"}


def test_local_llm_search_is_deterministic_and_every_constrained_answer_parses(make_config):
    # llama-tiny as the LLM: random weights; constrained decoding makes its answers parse anyway
    overrides = ("method=self_pruner", "method.llm.model=llama-tiny",
                 f"method.llm.chat_template={json.dumps(TEMPLATE)}", "method.llm.max_new_tokens=12", "method.retries=0")
    first = _search(make_config, *overrides)
    second = _search(make_config, *overrides)
    assert first[0] == second[0]
    assert _timeless(first[1]) == _timeless(second[1])
    answers, calls = first[1]["answers"], first[1]["calls"]
    # constrained decoding: every answer of the random-weight model parses, in bounds; only the mean shifts
    assert answers["calls"] == answers["usable"] == len(calls) >= 3
    assert answers["unusable"] == {} and answers["fallbacks"] == 0 and "clipped" not in answers["repairs"]
    shifted = [c for c in calls if c["repairs"]]
    assert answers["repairs"].get("mean_adjusted", 0) == answers["repaired_answers"] == len(shifted)
    if shifted:
        assert math.isclose(answers["repair_mean_abs_change"], sum(c["change"] for c in shifted) / len(shifted))
    assert all(c["parameters"]["schema"] == [2, 0.3, 0.7] for c in calls)
    assert all(c["messages"][0]["role"] == "system" for c in calls)
    # every answer's token count, the grammar's answer plus the stop token at most, adds up to the search's
    limit = len('{"rates": [0.30, 0.30]}') + 1
    assert all(1 <= c["generated_tokens"] <= limit for c in calls)
    assert first[1]["llm_tokens"] == sum(c["generated_tokens"] for c in calls)


def _timeless(search: dict) -> dict:
    """A search record without its wall times (which differ between identical runs)."""
    return {k: [{**c, "seconds": None} for c in v] if k == "calls" else v for k, v in search.items()
            if k != "seconds"}


class ScriptedLLM:
    """Answers from a fixed list, in order (cycling): exercises parsing/repair/fallback accounting."""

    description = "scripted"
    generated_tokens = None  # a script spends no tokens it could report

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def chat(self, messages, seed, schema=None):
        text = self.answers[self.calls % len(self.answers)]
        self.calls += 1
        if text is None:
            raise LLMError("connection reset")
        return text


def test_malformed_answers_are_handled_and_counted(make_config, monkeypatch):
    script = ['{"rates": [0.45, 0.55]}',  # fine
              "Layer 0 should be pruned less.",  # prose
              '{"rates": [0.5]}',  # wrong length
              '{"rates": [NaN, 0.5]}',  # NaN
              None,  # backend error
              "[90, 40]",  # percent -> clipped -> mean adjusted
              '{"rates": [0.9, 0.9]}']  # clipped + mean adjusted
    fake = ScriptedLLM(script)
    _, search, _ = _search(make_config, "method=self_pruner", "method.retries=0", "method.max_deviation=0.2",
                            "method.mutation_prob=1.0", make_llm=lambda cfg: fake)
    answers = search["answers"]
    calls = answers["calls"]
    assert calls == fake.calls
    expected_unusable = {}
    expected_repairs = {}
    for index in range(calls):
        kind = {1: "no_json", 2: "wrong_length", 3: "non_finite", 4: "backend_error"}.get(index % len(script))
        if kind:
            expected_unusable[kind] = expected_unusable.get(kind, 0) + 1
        elif index % len(script) in (5, 6):
            for repair_kind in (["percent_to_fraction"] if index % len(script) == 5 else []) + ["clipped",
                                                                                             "mean_adjusted"]:
                expected_repairs[repair_kind] = expected_repairs.get(repair_kind, 0) + 1
    assert answers["unusable"] == expected_unusable
    assert answers["repairs"] == expected_repairs
    assert answers["usable"] == calls - sum(expected_unusable.values())
    # how far the repairs moved the answers: [90, 40] -> [0.9, 0.4] -> clipped [0.7, 0.4] -> shifted
    # [0.65, 0.35] moves 0.15 per rate on average; [0.9, 0.9] -> [0.7, 0.7] -> [0.5, 0.5] moves 0.4
    changes = {script.index(c["answer"]): c["change"] for c in search["calls"] if c.get("repairs")}
    assert math.isclose(changes[5], 0.15) and math.isclose(changes[6], 0.4)
    repaired = [c["change"] for c in search["calls"] if c.get("repairs")]
    assert answers["repaired_answers"] == len(repaired)
    assert math.isclose(answers["repair_mean_abs_change"], sum(repaired) / len(repaired))
    assert math.isclose(answers["repair_max_abs_change"], 0.4)
    origins = {c["origin"] for c in search["candidates"]}
    assert {"llm_init", "fallback_init"} <= origins
    for candidate in search["candidates"]:
        assert 0.3 - 1e-12 <= min(candidate["rates"]) and max(candidate["rates"]) <= 0.7 + 1e-12
        assert abs(sum(candidate["rates"]) / 2 - 0.5) < 1e-9  # llama-tiny's two blocks have equal size


# ----------------------------------------------------------------------------- equal effort

# FAST's budget: the reference + a population of 3 (one the seeded uniform, a repeat) + 2 generations of
# 2 children, all distinct but the seeded uniform
DISTINCT = 1 + 3 + 2 * 2 - 1


def test_constant_answers_are_reasked_counted_as_duplicates_and_cannot_save_evaluations(make_config):
    # every constant answer repairs onto the uniform schedule, which the reference scored first
    fake = ScriptedLLM(['{"rates": [0.50, 0.50]}'])
    _, search, _ = _search(make_config, "method=self_pruner", "method.mutation_prob=0.0",
                           make_llm=lambda cfg: fake)
    assert search["budget"] == DISTINCT and search["evaluations"] == DISTINCT
    assert search["cache_hits"] == 1  # the seeded uniform alone
    slots = DISTINCT - 1  # every candidate after the reference, each asked 1 + reasks times
    assert search["duplicates"] == slots * 4 == fake.calls
    assert search["duplicates_by_origin"] == {"llm_init": 2 * 4, "llm_crossover": 2 * 2 * 4}
    assert [c["origin"] for c in search["candidates"]][2:] == ["duplicate_mutation"] * slots
    # a re-ask goes on with the same conversation: the repaired duplicate, then the request for another
    reasks = [c for c in search["calls"] if c["reask"]]
    assert len(reasks) == slots * 3
    assert all(c["messages"][-2] == {"role": "assistant", "content": '{"rates": [0.50, 0.50]}'}
               and "already scored" in c["messages"][-1]["content"] for c in reasks)
    # the initial population is asked for as a population: each call lists the schedules already in it
    inits = [c for c in search["calls"] if c["operator"] == "init" and not c["reask"]]
    assert "[0.50, 0.50]" in inits[0]["messages"][1]["content"]
    assert _short_rates(search["candidates"][2]) in inits[1]["messages"][1]["content"]


def _short_rates(candidate) -> str:
    return "[" + ", ".join(f"{r:.2f}" for r in candidate["rates"]) + "]"


LEAGUE = ["self_pruner", "self_pruner_ga", "random_search", "self_pruner_ga_smooth", "self_pruner_ga_llm_init",
          "self_pruner_llm_ga_init"]


@pytest.mark.parametrize("arm", LEAGUE)
def test_every_arm_of_a_tiny_league_spends_the_same_distinct_evaluations(make_config, arm):
    # the LLM arms answer constants and a few schedules, which repeat after the first few calls
    fake = ScriptedLLM(['{"rates": [0.50, 0.50]}', '{"rates": [0.40, 0.60]}', '{"rates": [0.60, 0.40]}'])
    _, search, _ = _search(make_config, f"method={arm}", make_llm=lambda cfg: fake)
    assert search["evaluations"] == search["budget"] == DISTINCT
    assert search["evaluations"] + search["cache_hits"] == search["candidates_total"]
    assert len({tuple(round(r, 3) for r in c["rates"]) for c in search["candidates"]}) == DISTINCT
    assert [h["generation"] for h in search["history"]] == [0, 1, 2]
    assert all(h["diversity"] >= 0 for h in search["history"]) and search["history"][0]["diversity"] > 0
    asked = fake.calls > 0
    assert asked == (arm in ("self_pruner", "self_pruner_ga_llm_init", "self_pruner_llm_ga_init"))
    origins = {c["origin"] for c in search["candidates"][2:]}
    own = {"self_pruner": {"llm_init", "llm_crossover", "llm_mutation"},
           "self_pruner_ga": {"ga_init", "ga_crossover", "ga_mutation"},
           "random_search": {"ga_init", "random"},
           "self_pruner_ga_smooth": {"smooth_init", "ga_crossover", "ga_mutation"},
           "self_pruner_ga_llm_init": {"llm_init", "ga_crossover", "ga_mutation"},
           "self_pruner_llm_ga_init": {"ga_init", "llm_crossover", "llm_mutation"}}[arm]
    assert origins <= own | {"duplicate_mutation"}
    init = {c["origin"] for c in search["candidates"] if c["generation"] == 0 and c["origin"] != "uniform"}
    assert init <= own | {"duplicate_mutation"} and init & own


def test_the_winner_is_picked_on_windows_no_fitness_call_saw(make_config, monkeypatch):
    windows = []
    score = fitness.Fitness._score
    monkeypatch.setattr(fitness.Fitness, "_score", lambda self, rates, w, logp: (
        windows.append(w), score(self, rates, w, logp))[1])
    rates, search, _ = _search(make_config, "method=self_pruner_ga", "method.rescore_top=3")
    rescore = search["rescore"]
    scored = sorted((c for c in search["candidates"] if not c["cached"]), key=lambda c: c["fitness"])
    assert [f["id"] for f in rescore["finalists"]] == [c["id"] for c in scored[:3]]
    assert rescore["fitness_best"] == scored[0]["id"]
    picked = min(rescore["finalists"], key=lambda f: f["rescore"])
    assert rescore["picked"] == picked["id"] == search["best"]["id"]
    assert list(rates.values())[0] == search["candidates"][picked["id"]]["rates"][0]
    # FAST: samples 0-1 prune every candidate, 2-3 are the fitness's windows, 4-5 the re-score's
    fitness_windows, rescore_windows = windows[:-3], windows[-3:]
    assert len(fitness_windows) == DISTINCT and all(w.shape[0] == 2 for w in windows)
    assert not any(any((r == f).all() for f in fitness_windows[0]) for r in rescore_windows[0])


def test_too_few_calibration_samples_for_the_rescore_fail_naming_it(make_config):
    with pytest.raises(ConfigError, match=r"fitness_nsamples \+ fitness_windows \+ rescore_windows = 7 samples"):
        _search(make_config, "method=self_pruner_ga", "method.rescore_windows=3")


def test_an_answer_at_the_bounds_needs_no_repair(make_config):
    # target 0.7 +- 0.2: the grammar's extreme literals 0.50 and 0.90 are in bounds, their mean is the target
    answer = ScriptedLLM(['{"rates": [0.90, 0.50]}'])
    _, search, _ = _search(make_config, "method=self_pruner", make_llm=lambda cfg: answer, target=0.7)
    assert search["bounds"] == [0.5, 0.9]
    assert search["answers"]["repairs"] == {} and search["answers"]["repaired_answers"] == 0
    assert all(c["repairs"] == [] and c["change"] == 0 for c in search["calls"])


def test_result_json_carries_the_search_and_plots(make_config, tmp_path):
    from bench.cell import run_cell

    cfg, resolved = make_config("model=llama-tiny", *FAST, "method=self_pruner_ga", "method.generations=1")
    result = run_cell(cfg, resolved, tmp_path)
    assert result.status == "ok", result.error
    saved = json.loads((tmp_path / "result.json").read_text())
    search = saved["allocator"]["search"]
    assert search["operators"] == "ga" and len(search["candidates"]) == search["candidates_total"]
    files = plot_search([tmp_path / "result.json"], tmp_path / "search")
    assert sorted(p.suffix for p in files) == [".png", ".svg"] and all(p.stat().st_size > 0 for p in files)
    files = plot_layer_schedules([result], tmp_path / "schedules")
    assert sorted(p.suffix for p in files) == [".pdf", ".png", ".svg"] and all(p.stat().st_size > 0 for p in files)
    best = search["best"]["rates"]
    assert list(block_means(result.sparsity["allocated"]).values()) == pytest.approx(best)  # the searched rates


def test_block_means_average_the_linears_of_each_block_in_block_order():
    allocated = {"model.layers.10.mlp.up_proj": 0.8, "model.layers.2.self_attn.q_proj": 0.4,
                 "model.layers.2.mlp.up_proj": 0.6, "lm_head": 0.0}
    assert block_means(allocated) == pytest.approx({2: 0.5, 10: 0.8})



def test_structured_search_removes_ffn_channels_at_the_searched_block_rates(make_config, tmp_path):
    """The same search over block-level FFN rates with a structured pruner (physical channel removal)."""
    from bench.cell import run_cell

    cfg, resolved = make_config("model=llama-tiny", *FAST, "method=self_pruner_ga", "method.pruner=wanda_sp",
                                "+method.selection=per_block", "method.generations=1", "sparsity=0.25")
    result = run_cell(cfg, resolved, tmp_path)
    assert result.status == "ok", result.error
    widths, allocated = result.sparsity["ffn_sizes"], result.sparsity["allocated"]
    down = {block_of(name): rate for name, rate in allocated.items() if name.endswith("down_proj")}
    assert [round(192 * (1 - down[block])) for block in sorted(down)] == widths
    assert abs(result.sparsity["measured"] - 0.25) < 1 / 192 + 1e-9
    assert result.sparsity["params_removed"] > 0


def test_global_channel_selection_cannot_silently_ignore_a_schedule(make_config):
    with pytest.raises(ConfigError, match="method.selection=global"):
        make_config("model=llama-tiny", *FAST, "method=self_pruner_ga", "method.pruner=wanda_sp")


# ----------------------------------------------------------------------------- config-time errors


def test_model_without_chat_template_fails_before_pruning(make_config):
    cfg, _ = make_config("model=llama-tiny", *FAST, "method=self_pruner")
    allocator = catalog.build(cfg.method).allocator
    with pytest.raises(ConfigError, match="no chat template"):
        allocator.bind(lifecycle.SearchContext(None, None, None, "cpu", make_backend))


@pytest.mark.parametrize("override, match", [
    ("method.operators=pso", "method.operators='pso' is not valid"),
    ("method.init=owl", "method.init='owl' is not valid; allowed: llm, ga, smooth"),
    ("method.reasks=-1", "method.reasks=-1 is out of range; allowed: >= 0"),
    ("method.rescore_top=0", "method.rescore_top=0 is out of range; allowed: >= 1"),
    ("method.prompts.duplicate='again $rates'", r"method.prompts.duplicate: bad placeholder"),
    ("method.elites=6", "method.elites=6 is out of range"),
    ("method.fitness_pruner=obs", "method.fitness_pruner='obs' is not known"),
    ("method.prompts.init='rates for $layers'", r"method.prompts.init: bad placeholder"),
    ("method.llm.backend=grpc", "method.llm.backend='grpc' is not valid"),
])
def test_bad_options_fail_at_config_time(make_config, override, match):
    with pytest.raises(ConfigError, match=match):
        make_config("model=llama-tiny", *TINY, "method=self_pruner", override)


def test_missing_api_key_and_unreachable_endpoint(monkeypatch):
    monkeypatch.delenv("PRUNEBENCH_TEST_KEY", raising=False)
    cfg = LLMConfig(backend="http", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="PRUNEBENCH_TEST_KEY")
    with pytest.raises(ConfigError, match="PRUNEBENCH_TEST_KEY.*not set"):
        make_backend(cfg)
    monkeypatch.setenv("PRUNEBENCH_TEST_KEY", "k")
    with pytest.raises(ConfigError, match="unreachable"):
        make_backend(cfg)


# ----------------------------------------------------------------------------- HTTP backend


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer secret":
            return self._reply(401, {"error": "bad key"})
        self._reply(200, {"data": [{"id": "fake"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(request)
        if request["messages"][-1]["content"] == "fail":
            return self._reply(500, {"error": "boom"})
        self._reply(200, {"choices": [{"message": {"role": "assistant", "content": '{"rates": [0.1, 0.2]}'}}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _FakeOpenAI.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_http_backend_against_a_loopback_server(server, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_TEST_KEY", "secret")
    cfg = LLMConfig(backend="http", model="fake", base_url=server, api_key_env="PRUNEBENCH_TEST_KEY",
                    temperature=0.3, max_new_tokens=50)
    llm = make_backend(cfg)
    assert isinstance(llm, HttpChat)
    messages = [{"role": "user", "content": "rates please"}]
    assert parse_rates(llm.chat(messages, seed=7), 2) == ([0.1, 0.2], "ok")
    sent = _FakeOpenAI.requests[-1]
    assert sent["model"] == "fake" and sent["messages"] == messages and sent["seed"] == 7
    assert sent["max_tokens"] == 50 and math.isclose(sent["temperature"], 0.3)
    with pytest.raises(LLMError, match="500"):
        llm.chat([{"role": "user", "content": "fail"}], seed=0)
    monkeypatch.setenv("PRUNEBENCH_TEST_KEY", "wrong")
    with pytest.raises(ConfigError, match="rejected the API key"):
        make_backend(cfg)


def test_llama2_experiment_preset_validates_with_targets():
    from bench.config import validate
    from tests.conftest import compose_config

    cfg = compose_config("experiment=self_pruner_llama2")
    run = validate(cfg)
    assert run.method.allocator == "self_pruner" and run.model.name == "llama2-70b"
    assert run.method.pruner == "wanda_sp"  # structured: FFN channels removed physically
    assert run.eval.zeroshot is not None and run.eval.speed is not None  # accuracy drop and speed-up
    assert {(t.sparsity, t.metric, t.unit) for t in cfg.targets} == {
        (0.37, "acc_avg_drop", "absolute"), (0.37, "speedup/prefill", "relative"),
        (0.62, "acc_avg_drop", "absolute"), (0.62, "speedup/prefill", "relative")}
    assert all("cannot run here" in t.note for t in cfg.targets)


# ----------------------------------------------------------------------------- replay


def _record(search: dict, directory) -> None:
    write_result(directory, Result(status="ok", config_hash="h", cell=CellKey("llama-tiny", "self_pruner", 0.5),
                                   allocator={"search": search}))


def _no_llm(cfg):
    raise AssertionError("a replay must not build an LLM")


def test_replay_reproduces_the_search_without_any_llm(make_config, tmp_path):
    # answers of every kind, so the replay also reproduces fallbacks and repairs
    script = ['{"rates": [0.45, 0.55]}', "prose", None, '{"rates": [0.9, 0.9]}', '{"rates": [0.62, 0.38]}',
              '{"rates": [0.41, 0.59]}', '{"rates": [0.57, 0.43]}', '{"rates": [0.36, 0.64]}']
    options = ("method=self_pruner", "method.retries=1", "method.mutation_prob=0.5", "method.generations=3")
    rates, search, _ = _search(make_config, *options, make_llm=lambda cfg: ScriptedLLM(script))
    assert {"llm_init", "fallback_init", "llm_crossover", "duplicate_mutation"} <= {c["origin"] for c in search["candidates"]}
    _record(search, tmp_path)
    for source in (tmp_path, tmp_path / "result.json"):
        replayed_rates, replayed, _ = _search(make_config, *options, f"method.llm.replay={source}", make_llm=_no_llm)
        assert replayed_rates == rates
        assert replayed["candidates"] == search["candidates"] and replayed["answers"] == search["answers"]
        assert replayed["llm"].startswith("replay of scripted from")


def test_replay_refuses_other_options_and_stops_where_it_diverges(make_config, tmp_path):
    script = ['{"rates": [0.45, 0.55]}', '{"rates": [0.62, 0.38]}']
    _, search, _ = _search(make_config, "method=self_pruner", make_llm=lambda cfg: ScriptedLLM(script))
    _record(search, tmp_path)
    other = r"method.llm.replay=.* was searched with other options: population=3 \(now 4\)"
    with pytest.raises(ConfigError, match=other):
        _search(make_config, "method=self_pruner", "method.population=4", f"method.llm.replay={tmp_path}")
    search["calls"][1]["messages"][1]["content"] += " (edited)"
    _record(search, tmp_path)
    with pytest.raises(SearchFailed, match="replay diverged at call 1 "):
        _search(make_config, "method=self_pruner", f"method.llm.replay={tmp_path}", make_llm=_no_llm)
    with pytest.raises(ConfigError, match="method.llm.replay=.* is not a readable result"):
        _search(make_config, "method=self_pruner", f"method.llm.replay={tmp_path / 'missing'}")


# ----------------------------------------------------------------------------- every LLM call failed


@pytest.mark.parametrize("answer", ["I would prune the middle layers.", "", LLMError("HTTP 500: boom"),
                                    LLMError("HTTP 401: invalid key")], ids=["garbage", "empty", "500", "401"])
def test_a_search_whose_llm_calls_all_fail_fails_unless_the_fallback_is_allowed(make_config, answer):
    fake = _Failing(answer)
    with pytest.raises(SearchFailed, match=r"all 4 LLM calls failed \(.*\).*method.allow_fallback=true"):
        _search(make_config, "method=self_pruner", make_llm=lambda cfg: fake)
    assert fake.calls == 4  # the initial population's 2 operator calls x (1 + retries); no generation after
    details = _search(make_config, "method=self_pruner", "method.allow_fallback=true",
                      make_llm=lambda cfg: _Failing(answer), full=True)[1]
    assert len(details["warnings"]) == 1 and "the search ran on the classical GA operators" in details["warnings"][0]
    assert details["search"]["answers"]["usable"] == 0


class _Failing:
    description = "failing"
    generated_tokens = None  # a script spends no tokens it could report

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def chat(self, messages, seed, schema=None):
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_the_cell_fails_with_the_reason_and_an_allowed_fallback_is_a_warning(make_config, tmp_path, monkeypatch):
    from bench import llm
    from bench.cell import run_cell

    monkeypatch.setattr(llm, "make_backend", lambda cfg, **options: _Failing(LLMError("HTTP 500: boom")))
    cfg, resolved = make_config("model=llama-tiny", *FAST, "method=self_pruner", "method.generations=1")
    result = run_cell(cfg, resolved, tmp_path / "strict")
    assert result.status == "failed" and result.error.type == "SearchFailed"
    assert "all 4 LLM calls failed (backend_error: 4" in result.error.message
    cfg, resolved = make_config("model=llama-tiny", *FAST, "method=self_pruner", "method.generations=1",
                                "method.allow_fallback=true")
    result = run_cell(cfg, resolved, tmp_path / "allowed")
    assert result.status == "ok", result.error
    assert any(re.search(r"all \d+ LLM calls failed", w) and "classical GA" in w for w in result.warnings)


def test_some_fallbacks_are_a_warning_in_the_record(make_config):
    script = ['{"rates": [0.45, 0.55]}', "prose"]
    details = _search(make_config, "method=self_pruner", "method.retries=0",
                      make_llm=lambda cfg: ScriptedLLM(script), full=True)[1]
    fallbacks = details["search"]["answers"]["fallbacks"]
    assert fallbacks > 0 and details["warnings"] == [
        f"self_pruner: {fallbacks} LLM operator calls got no usable answer (no_json: {fallbacks}); the classical "
        f"operator stood in for them"]


# ----------------------------------------------------------------------------- bad input, before pruning


@pytest.mark.parametrize("overrides, match", [
    ((), "has no chat template"),
    (("method.llm.backend=http", "method.llm.base_url=http://127.0.0.1:9/v1", "method.llm.api_key_env=PB_NO_KEY"),
     "PB_NO_KEY.*environment variable is not set"),
    (("method.llm.backend=http", "method.llm.base_url=http://127.0.0.1:9/v1", "method.llm.api_key_env=PB_KEY"),
     "base_url='http://127.0.0.1:9/v1' is unreachable"),
], ids=["no_chat_template", "missing_key", "unreachable"])
def test_bad_llm_setup_fails_in_one_line_before_any_pruning(make_config, monkeypatch, overrides, match):
    monkeypatch.setenv("PB_KEY", "k")
    monkeypatch.delenv("PB_NO_KEY", raising=False)
    pruned = []
    monkeypatch.setattr(type(catalog.build(make_config("model=llama-tiny", *FAST, "method=self_pruner")[0].method)
                             .pruner), "prune_block", lambda self, view, rates: pruned.append(view.index))
    with pytest.raises(ConfigError, match=match) as error:
        _search(make_config, "method=self_pruner", *overrides)
    assert "\n" not in str(error.value) and pruned == []


# ----------------------------------------------------------------------------- KL-to-dense fitness


def test_kl_fitness_is_zero_for_the_dense_model_and_grows_with_pruning(make_config, monkeypatch):
    cfg, _ = make_config("model=llama-tiny", *FAST, "method=self_pruner_ga", "method.fitness=kl")
    model, samples = _tiny_model_and_samples(cfg)
    method = catalog.build(cfg.method)
    context = lifecycle.SearchContext(model, samples, method.pruner, "cpu")
    dense_passes = []
    real = fitness.log_probs
    monkeypatch.setattr(fitness, "log_probs", lambda m, w, d: dense_passes.append(m is model) or real(m, w, d))
    sizes = {name: linear.weight.numel() for name, linear in prunable_linears(model).items()}
    search = Search(method.allocator.options, None, context, sizes, 0.5)
    kl = [search.fitness(np.full(2, rate))[0] for rate in (0.0, 0.3, 0.6)]
    assert abs(kl[0]) < 1e-5 and 0 < kl[1] < kl[2]
    # the dense distributions: once per search, on the fitness's windows and on the re-score's
    assert dense_passes == [True, True]  # the candidates' own are computed layer-wise (no model copy)


def test_rates_outside_0_1_are_marked_apart_from_rates_outside_the_search_band(make_config):
    """1.7 and -0.4 are not rates at all, 0.75 is one the band [0.3, 0.7] does not allow: both are clipped,
    and the record tells them apart, per call and in its counts."""
    fake = ScriptedLLM(['{"rates": [1.7, -0.4]}', '{"rates": [0.75, 0.25]}'])
    _, search, _ = _search(make_config, "method=self_pruner", "method.retries=0", "method.max_deviation=0.2",
                           make_llm=lambda cfg: fake)
    marks = {c["answer"]: c["repairs"] for c in search["calls"]}
    assert marks['{"rates": [1.7, -0.4]}'] == ["out_of_domain", "clipped"]
    assert marks['{"rates": [0.75, 0.25]}'] == ["clipped"]
    assert search["answers"]["repairs"]["out_of_domain"] == sum(
        c["answer"] == '{"rates": [1.7, -0.4]}' for c in search["calls"])


@pytest.mark.parametrize("overrides", [
    ["method.fitness=ppl"], ["method.fitness=kl"],
    ["method.pruner=wanda_sp", "+method.selection=per_block"],  # structured: the blocks change shape
    ["method.pruner=sparsegpt", "method.fitness=kl"]], ids=["ppl", "kl", "structured", "sparsegpt"])
def test_a_candidate_is_scored_without_a_copy_of_the_model_as_a_pruned_copy_scores(make_config, monkeypatch,
                                                                                   overrides):
    """At 70B a whole-model copy per candidate is 128 GiB beside the model: the candidate's fitness is the
    one a pruned copy of the whole model gets, computed with no copy of it, and the model stays dense."""
    from transformers import PreTrainedModel

    from bench.core import perplexity
    from methods.base import Method

    cfg, _ = make_config("model=llama-tiny", *FAST, "method=self_pruner_ga", *overrides)
    model, samples = _tiny_model_and_samples(cfg)
    method = catalog.build(cfg.method)
    sizes = {name: linear.weight.numel() for name, linear in prunable_linears(model).items()}
    search = Search(method.allocator.options, None, lifecycle.SearchContext(model, samples, method.pruner, "cpu"),
                    sizes, 0.5)
    score = search.fitness
    rates = np.array([0.3, 0.7])
    copied = copy.deepcopy(model)  # the fitness as it was: prune a copy, score it whole
    lifecycle.prune(copied, Method("fitness", fitness._Fixed({n: rates[block_of(n)] for n in sizes}),
                                   copy.deepcopy(score.pruner)), score.calib, 0.5, "cpu")
    if score.dense_logp is None:
        expected = perplexity.perplexity(copied, score.heldout, "cpu", layerwise=False)
    else:
        pruned = fitness.log_probs(copied, score.heldout, "cpu")
        expected = torch.nn.functional.kl_div(pruned, score.dense_logp, log_target=True, reduction="sum").item() / (
            pruned.shape[0] * pruned.shape[1])
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    real = copy.deepcopy

    def no_model_copy(value, *args):
        assert not isinstance(value, PreTrainedModel), "a candidate copied the whole model"
        return real(value, *args)

    monkeypatch.setattr(copy, "deepcopy", no_model_copy)
    assert score(rates)[0] == pytest.approx(expected, rel=1e-5) and expected > 0
    after = model.state_dict()
    assert after.keys() == dense.keys() and all(torch.equal(after[name], dense[name]) for name in dense)


def _rss() -> int:
    return int(re.search(r"^Rss:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text(), re.M).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's memory accounting")
def test_a_candidate_on_a_loaded_checkpoint_leaves_no_second_copy_of_the_blocks_resident(make_config, tmp_path):
    """Loaded weights are views of the checkpoint's private file mapping, which lives as long as any of them
    (the embeddings): a candidate that swapped each block's dense copy into the model left the pages its
    pruning wrote resident beside the copies, a model more per search (SmolLM2: 1.67 GiB peak RSS where
    the plan said 1.13). The dense weights go back into the block's own tensors."""
    import transformers

    cfg, _ = make_config("model=llama-tiny", *FAST, "method=self_pruner_ga", "model.architecture.hidden_size=256",
                         "model.architecture.intermediate_size=1024", "model.architecture.num_hidden_layers=16")
    random_model, samples = _tiny_model_and_samples(cfg)
    random_model.save_pretrained(tmp_path / "checkpoint")
    del random_model
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", dtype=torch.float32).eval()
    method = catalog.build(cfg.method)
    sizes = {name: linear.weight.numel() for name, linear in prunable_linears(model).items()}
    search = Search(method.allocator.options, None, lifecycle.SearchContext(model, samples, method.pruner, "cpu"),
                    sizes, 0.5)
    blocks = list(model.model.layers)
    tensors = [p.data_ptr() for p in model.model.layers.parameters()]
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    float(sum(p.detach().sum() for p in model.parameters()))  # every weight resident, as after any forward
    libc = ctypes.CDLL("libc.so.6")  # freed heap memory given back: what is left resident is held
    libc.malloc_trim(0)
    before = _rss()
    search.fitness(np.full(len(blocks), 0.5))
    libc.malloc_trim(0)
    grown = _rss() - before
    assert grown < block_bytes / 4, f"{grown / 2**20:.1f} MiB more resident after one candidate, blocks " \
                                    f"{block_bytes / 2**20:.1f} MiB"
    assert list(model.model.layers) == blocks and [p.data_ptr() for p in model.model.layers.parameters()] == tensors
