"""Chat LLM backends behind one small interface: `chat(messages, seed) -> str`.

- `LocalChat`: any model of the zoo (`conf/model/<name>.yaml`, loaded through `bench.models.load`),
  prompted through its tokenizer's chat template (or one given in config), sampled with a seeded
  generator so a run is reproducible.
- `HttpChat`: any OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp server, OpenAI),
  stdlib `urllib` only; the API key is read from an environment variable, never from config.

Both check what they can at construction (the model has a chat template; the key is set; the endpoint
answers), so a bad setup fails before any pruning work starts.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Protocol

import torch

from bench import models
from bench.config import zoo_entry
from bench.core.vocab import ConfigError
from methods.allocators.self_pruner import LLMConfig, LLMError

log = logging.getLogger(__name__)


class ChatLLM(Protocol):
    description: str

    def chat(self, messages: list[dict], seed: int) -> str: ...


def make_backend(cfg: LLMConfig, key: str = "method.llm") -> ChatLLM:
    """The backend `cfg` (self_pruner's `method.llm` keys) names, checked and ready to answer."""
    if not cfg.model:
        raise ConfigError(f"{key}.model is not set; name a zoo model (local) or the served model (http)")
    if cfg.max_new_tokens < 1 or cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"{key}: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                          f"{cfg.max_new_tokens}, {cfg.temperature}, {cfg.top_p}")
    return LocalChat(cfg, key) if cfg.backend == "local" else HttpChat(cfg, key)


class LocalChat:
    def __init__(self, cfg: LLMConfig, key: str):
        self.cfg = cfg
        self.model, self.tokenizer = models.load(zoo_entry(cfg.model))
        if cfg.chat_template is not None:
            self.tokenizer.chat_template = cfg.chat_template
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{key}.model={cfg.model!r} has no chat template; pick an instruct model or set "
                              f"{key}.chat_template")
        self.description = f"local:{cfg.model}"

    @torch.no_grad()
    def chat(self, messages: list[dict], seed: int) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        sample = self.cfg.temperature > 0
        with torch.random.fork_rng(devices=[]):  # the run's global RNG stays untouched
            torch.manual_seed(seed)
            output = self.model.generate(
                **encoded, max_new_tokens=self.cfg.max_new_tokens, do_sample=sample,
                temperature=self.cfg.temperature if sample else None, top_p=self.cfg.top_p if sample else None,
                top_k=None, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


class HttpChat:
    def __init__(self, cfg: LLMConfig, key: str):
        if not cfg.base_url:
            raise ConfigError(f"{key}.base_url is not set; give the endpoint, e.g. http://127.0.0.1:8000/v1")
        self.api_key = os.environ.get(cfg.api_key_env)
        if not self.api_key:
            raise ConfigError(f"{key}.api_key_env={cfg.api_key_env!r}: environment variable is not set "
                              f"(put the endpoint's API key there; any non-empty value for servers without auth)")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/")
        self.description = f"http:{cfg.model}@{self.url}"
        self._probe(key)

    def _probe(self, key: str) -> None:
        """GET /models: proves the server is reachable and accepts the key before the search starts."""
        request = urllib.request.Request(f"{self.url}/models", headers=self._headers())
        try:
            urllib.request.urlopen(request, timeout=min(self.cfg.timeout_s, 10)).close()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ConfigError(f"{key}.base_url={self.cfg.base_url!r} rejected the API key from "
                                  f"${self.cfg.api_key_env} (HTTP {exc.code})") from None
            # any other status: the server is there; some servers do not implement /models
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"{key}.base_url={self.cfg.base_url!r} is unreachable ({reason})") from None

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}

    def chat(self, messages: list[dict], seed: int) -> str:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_new_tokens, "seed": seed}
        request = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode(),
                                         headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                payload = json.loads(response.read())
            return payload["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"{self.description}: {type(exc).__name__}: {exc}") from None
