"""Chat LLM backends behind one small interface: `chat(messages, seed, schema=None) -> str`.

Both implement `ChatLLM`, the chat contract of `methods.search.chat`. `schema` (a `RatesSchema(n, low,
high)`, of the same contract) asks for an answer of the form `{"rates": [r_1, ..., r_n]}` with exactly n
numbers, each in [low, high]. What each backend guarantees about it:

- `LocalChat`: any model of the zoo (`conf/model/<name>.yaml`, loaded through `bench.models.load`) on
  the cell's device, prompted through its tokenizer's chat template (or one given in config), sampled
  with a seeded generator so a run is reproducible. With a schema, decoding is *constrained* (xgrammar's grammar
  matcher masks the logits at every step, before temperature and top-p) to the regular language
  `{"rates": [v, v, ..., v]}` where every v is a fixed-point literal in [low, high] (two decimals, more
  only when no two-decimal value fits): the answer always parses to exactly n values within range,
  whatever the model's weights.
- `HttpChat`: any OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp server, OpenAI)
  through the `openai` client. With a schema it sends a JSON-schema `response_format`: OpenAI's
  `{"type": "json_schema", ...}` (OpenAI, vLLM), else llama-cpp-python's `{"type": "json_object",
  "schema": ...}`, else none: a form the server rejects (HTTP 400/422, or any error naming
  `response_format`; llama-cpp-python answers 500) is dropped for the rest of the run. The server may
  or may not enforce it; the caller parses the answer as text either way. Hardening: only http(s)
  URLs; the API key is read from the environment variable named by `api_key_env` and never stored in
  config or results; redirects are not followed (a redirect is an error, so the key never goes to
  another origin and a redirected answer is never accepted); every call has one overall deadline
  (`timeout_s`, covering retries, backoff and slow bodies, not a per-read timeout); 429/5xx/connection
  errors are retried with exponential backoff within that deadline; a response body over
  `max_response_bytes` is refused; plain http to a non-loopback host logs a warning.

With a schema both raise `max_new_tokens` to the length of the grammar's answers (`token_limit`).
Neither backend repairs values (clipping, mean shift): that stays with the caller
(`methods.search.evolution.repair`). Both check what they can at construction (the model has a
chat template; the URL is http(s); the key is set; the endpoint answers and accepts the key), so a bad
setup fails before any pruning work starts.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
import urllib.parse
from typing import Optional

import httpx2 as httpx  # the openai client's HTTP library from openai 3.x on
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench import models
from bench.config import zoo_entry
from bench.core.vocab import ConfigError
from methods.search.chat import ChatLLM, LLMConfig, LLMError, RatesSchema

log = logging.getLogger(__name__)


def make_backend(cfg: LLMConfig, key: str = "method.llm", device: str = "cpu") -> ChatLLM:
    """The backend `cfg` (self_pruner's `method.llm` keys, range-checked there) names, checked and ready;
    a local model generates on `device` (the cell's)."""
    if not cfg.model:
        raise ConfigError(f"{key}.model is not set; name a zoo model (local) or the served model (http)")
    return LocalChat(cfg, key, device) if cfg.backend == "local" else HttpChat(cfg, key)


def token_limit(max_new_tokens: int, schema: Optional[RatesSchema]) -> int:
    """The generation limit of one answer: `max_new_tokens`, raised to what the answer's grammar needs
    (a 70B model's 80-block answer is ~400 characters, over the default 256), or a truncated answer is
    all a search ever gets."""
    if schema is None:
        return max_new_tokens
    return max(max_new_tokens, schema.max_chars + 1)  # every token is at least one character, plus the stop


# ----------------------------------------------------------------------------- local


class _GrammarMask(LogitsProcessor):
    """A transformers logits processor: only tokens that keep the output inside the grammar survive.

    One per `generate` call (the matcher holds the position in the grammar); batch size 1. Placed in
    `logits_processor`, it runs before generate's temperature and top-p warpers, so sampling only ever
    sees allowed tokens."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar  # seconds to import: only a local LLM's constrained decoding needs it

        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.apply_bitmask = xgrammar.apply_token_bitmask_inplace
        self.started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise ValueError("constrained decoding supports batch size 1 only")
        if self.started and not self.matcher.accept_token(int(input_ids[0, -1])):
            raise LLMError("constrained decoding: the sampled token left the grammar")  # cannot happen
        self.started = True
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.apply_bitmask(scores, self.bitmask.to(scores.device))
        return scores


class LocalChat:
    def __init__(self, cfg: LLMConfig, key: str, device: str):
        self.cfg = cfg
        self.model, self.tokenizer = models.load(zoo_entry(cfg.model))
        self.device = torch.device(device)
        self.model.to(self.device)
        if cfg.chat_template is not None:
            self.tokenizer.chat_template = cfg.chat_template
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{key}.model={cfg.model!r} has no chat template; pick an instruct model or set "
                              f"{key}.chat_template")
        self.description = f"local:{cfg.model}"
        self._compiler = None
        self._grammars: dict = {}
        self.generated_tokens: Optional[int] = None

    def _grammar(self, schema: RatesSchema):
        if schema not in self._grammars:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self._vocab_size(), stop_token_ids=[self.tokenizer.eos_token_id])
                self._compiler = xgrammar.GrammarCompiler(info)
            self._grammars[schema] = self._compiler.compile_regex(schema.regex())
        return self._grammars[schema]

    def _vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]  # may exceed len(tokenizer) (padding)

    @torch.no_grad()
    def chat(self, messages: list[dict], seed: int, schema: Optional[RatesSchema] = None) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(self.device)
        sample = self.cfg.temperature > 0
        limit, extra = token_limit(self.cfg.max_new_tokens, schema), {}
        if schema is not None:
            extra = {"logits_processor": LogitsProcessorList([_GrammarMask(self._grammar(schema),
                                                                           self._vocab_size())]),
                     "eos_token_id": self.tokenizer.eos_token_id}
        on_gpu = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=on_gpu):  # the run's global RNGs stay untouched
            torch.manual_seed(seed)
            output = self.model.generate(
                **encoded, max_new_tokens=limit, do_sample=sample,
                temperature=self.cfg.temperature if sample else None, top_p=self.cfg.top_p if sample else None,
                top_k=None, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **extra)
        answer = output[0, encoded["input_ids"].shape[1]:]
        self.generated_tokens = int(answer.shape[0])
        return self.tokenizer.decode(answer.tolist(), skip_special_tokens=True)


# ----------------------------------------------------------------------------- http


class _Refused(Exception):
    """Raised inside the transport: the response broke a limit (size or deadline); never retried."""


class _GuardedTransport(httpx.BaseTransport):
    """Wraps httpx2's transport: per-request timeouts cut to the call's deadline, bodies size-capped
    (Content-Length checked up front, then counted while read) and read against the deadline."""

    def __init__(self, max_bytes: int):
        self.inner = httpx.HTTPTransport()
        self.max_bytes = max_bytes
        self.local = threading.local()

    def deadline(self) -> Optional[float]:
        return getattr(self.local, "deadline", None)

    def handle_request(self, request):
        deadline = self.deadline()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Refused("deadline passed")
            request.extensions["timeout"] = {name: left if value is None else min(value, left)
                                             for name, value in request.extensions.get("timeout", {}).items()}
        response = self.inner.handle_request(request)
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise _Refused(f"response body of {length} bytes is over max_response_bytes={self.max_bytes}")
        # the cap counts decoded bytes (a 200 KB gzip body inflates to gigabytes): the body is decoded
        # here, under the cap, and handed on as plain bytes
        encoded = httpx.Response(response.status_code, headers=response.headers, stream=response.stream,
                                 request=request)
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(response.status_code, headers=headers, request=request, extensions=response.extensions,
                              stream=_CappedStream(encoded, self.max_bytes, deadline))

    def close(self):
        self.inner.close()


class _CappedStream(httpx.SyncByteStream):
    def __init__(self, encoded: "httpx.Response", max_bytes: int, deadline: Optional[float]):
        self.encoded, self.max_bytes, self.deadline = encoded, max_bytes, deadline

    def __iter__(self):
        total = 0
        for chunk in self.encoded.iter_bytes():
            total += len(chunk)
            if total > self.max_bytes:
                raise _Refused(f"response body over max_response_bytes={self.max_bytes}")
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise _Refused("deadline passed while reading the response")
            yield chunk

    def close(self):
        self.encoded.close()


RESPONSE_FORMATS = ("json_schema", "json_object")  # tried in this order; then plain requests


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpChat:
    def __init__(self, cfg: LLMConfig, key: str):
        import openai  # slow to import; only the http backend needs it

        if not cfg.base_url:
            raise ConfigError(f"{key}.base_url is not set; give the endpoint, e.g. http://127.0.0.1:8000/v1")
        url = urllib.parse.urlsplit(cfg.base_url)  # an http(s) URL with a host: LLMConfig checked it
        if url.username or url.password:
            raise ConfigError(f"{key}.base_url must not carry credentials; put the key in ${cfg.api_key_env}")
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ConfigError(f"{key}.api_key_env={cfg.api_key_env!r}: environment variable is not set "
                              f"(put the endpoint's API key there; any non-empty value for servers without auth)")
        if url.scheme == "http" and not _is_loopback(url.hostname):
            log.warning("%s.base_url=%s sends the API key unencrypted (plain http to a non-loopback host); "
                        "use https", key, cfg.base_url)
        self.cfg, self.key = cfg, key
        self.url = cfg.base_url.rstrip("/")
        self.description = f"http:{cfg.model}@{self.url}"
        self.format_level = 0  # index into RESPONSE_FORMATS; len(RESPONSE_FORMATS): plain requests
        self.generated_tokens: Optional[int] = None
        self._openai = openai
        self._transport = _GuardedTransport(cfg.max_response_bytes)
        # redirects are not followed: the openai client's own default client would follow them
        http = httpx.Client(transport=self._transport, follow_redirects=False, timeout=cfg.timeout_s)
        self.client = openai.OpenAI(api_key=api_key, base_url=self.url, max_retries=0, timeout=cfg.timeout_s,
                                    http_client=http)
        self._probe()

    def _probe(self) -> None:
        """GET /models: proves the server is reachable and accepts the key before the search starts."""
        openai = self._openai
        where = f"{self.key}.base_url={self.cfg.base_url!r}"
        try:
            self._with_deadline(min(self.cfg.timeout_s, 10.0), lambda: self.client.models.with_raw_response.list())
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(f"{where} rejected the API key from ${self.cfg.api_key_env} "
                              f"(HTTP {exc.status_code})") from None
        except openai.APIStatusError as exc:
            if 300 <= exc.status_code < 400:
                target = exc.response.headers.get("location", "?")
                raise ConfigError(f"{where} redirects (HTTP {exc.status_code} to {target}); redirects are not "
                                  f"followed, give the final URL") from None
            # any other status: the server is there; some servers do not implement /models
        except (openai.APIConnectionError, _Refused) as exc:
            raise ConfigError(f"{where} is unreachable ({_reason(exc)})") from None

    def _with_deadline(self, seconds: float, call):
        self._transport.local.deadline = time.monotonic() + seconds
        try:
            return call()
        finally:
            self._transport.local.deadline = None

    def chat(self, messages: list[dict], seed: int, schema: Optional[RatesSchema] = None) -> str:
        openai = self._openai
        deadline = time.monotonic() + self.cfg.timeout_s
        attempt, level = 0, self.format_level
        while True:
            structured = schema is not None and level < len(RESPONSE_FORMATS)
            try:
                text = self._complete(messages, seed, schema, RESPONSE_FORMATS[level] if structured else None,
                                      deadline)
                if schema is not None and level != self.format_level:
                    self.format_level = level
                    log.warning("%s rejects the other response_format forms; using %s from now on",
                                self.description, RESPONSE_FORMATS[level] if structured else "plain requests")
                return text
            except openai.APIStatusError as exc:
                status = exc.status_code
                if structured and (status in (400, 422) or "response_format" in str(exc)):
                    level += 1  # this form of response_format is rejected: the next one, then none
                    continue
                error, retry = f"HTTP {status}: {_reason(exc)}", status == 429 or status >= 500
            except openai.APITimeoutError:
                error, retry = f"no answer within timeout_s={self.cfg.timeout_s}", False
            except openai.APIConnectionError as exc:
                cause = exc.__cause__
                if isinstance(cause, _Refused):
                    raise LLMError(f"{self.description}: {cause}") from None
                error, retry = f"connection: {_reason(exc)}", True
            except _Refused as exc:
                raise LLMError(f"{self.description}: {exc}") from None
            if time.monotonic() >= deadline:
                raise LLMError(f"{self.description}: no answer within timeout_s={self.cfg.timeout_s} ({error})")
            if not retry or attempt >= self.cfg.max_retries:
                raise LLMError(f"{self.description}: {error}" + (f" after {attempt + 1} attempts" if retry else ""))
            delay = min(0.5 * 2 ** attempt, 8.0)
            if time.monotonic() + delay >= deadline:
                raise LLMError(f"{self.description}: no answer within timeout_s={self.cfg.timeout_s} ({error})")
            log.info("%s: %s; retrying in %.1f s", self.description, error, delay)
            time.sleep(delay)
            attempt += 1

    @property
    def structured(self) -> bool:
        """Whether calls with a schema still send a response_format."""
        return self.format_level < len(RESPONSE_FORMATS)

    def _complete(self, messages, seed, schema: Optional[RatesSchema], form: Optional[str],
                  deadline: float) -> str:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p, "max_tokens": token_limit(self.cfg.max_new_tokens, schema), "seed": seed}
        if form == "json_schema":  # OpenAI, vLLM
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "rates", "strict": True, "schema": schema.json_schema()}}
        elif form == "json_object":  # llama-cpp-python's server
            body["response_format"] = {"type": "json_object", "schema": schema.json_schema()}
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Refused(f"no answer within timeout_s={self.cfg.timeout_s}")
        self._transport.local.deadline = deadline
        try:
            raw = self.client.chat.completions.with_raw_response.create(**body, timeout=left)
            content = raw.http_response.read()  # through the capped stream
        finally:
            self._transport.local.deadline = None
        try:
            payload = json.loads(content)
            text = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"{self.description}: malformed response ({type(exc).__name__}: "
                           f"{content[:200]!r})") from None
        if not isinstance(text, str):
            raise LLMError(f"{self.description}: the response has no text content ({text!r:.200})")
        usage = payload.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        # a server that reports no usage leaves the count unknown rather than guessed from the text
        self.generated_tokens = tokens if isinstance(tokens, int) else None
        return text


def _reason(exc: BaseException) -> str:
    """One line: the exception's message, plus its cause's unless it is an HTTP status error."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if getattr(exc, "status_code", None) is None and cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return " ".join(text.split())[:300]
