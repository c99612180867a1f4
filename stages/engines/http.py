"""An OpenAI-compatible HTTP endpoint (``vllm serve``) as an engine."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from pairsift.stages.engines.base import (
    Completion,
    Engine,
    EngineConfig,
    Prompt,
    SamplingParams,
    chat_messages,
    prompt_seed,
)
from pairsift.stages.untrusted_text import defuse

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIEngine(Engine):
    """``/v1/completions`` (text) and ``/v1/chat/completions`` (chat, images) of a ``vllm serve`` endpoint.

    Up to ``concurrency`` requests in flight; each waits at most ``timeout_s`` per connect/read/write;
    connection errors, timeouts, 429 and 5xx are retried ``retries`` times with exponential backoff.
    """

    def __init__(self, cfg: EngineConfig, sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.cfg = cfg
        self.httpx = httpx
        self.sleep = sleep
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ValueError(f"engine api_key_env: environment variable {cfg.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self.client = httpx.Client(
            base_url=cfg.base_url.rstrip("/") + "/",  # type: ignore[union-attr]
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=limits,
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment must not see the traffic
        )
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="openai-engine")
        self._lock = threading.Lock()
        self.requests_sent = 0

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        jobs = [self.pool.submit(self._one, i, p, params) for i, p in enumerate(prompts)]
        return [job.result() for job in jobs]

    def _body(self, index: int, prompt: Prompt, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": 1,
            "seed": prompt_seed(self.cfg.seed, index, prompt),
        }
        if params.stop:
            body["stop"] = list(params.stop)
        # the server tokenizes: text that spells a control token is defused before it leaves
        prompt = replace(prompt, text=defuse(prompt.text))
        if self.cfg.chat or prompt.image is not None:
            return "chat/completions", {**body, "messages": chat_messages(prompt)}
        return "completions", {**body, "prompt": prompt.text}

    def _one(self, index: int, prompt: Prompt, params: SamplingParams) -> Completion:
        path, body = self._body(index, prompt, params)
        error = "no attempt"
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.sleep(min(0.25 * 2 ** (attempt - 1), 8.0))
            with self._lock:
                self.requests_sent += 1
            try:
                response = self.client.post(path, json=body)
            except self.httpx.HTTPError as exc:  # timeouts, refused/reset connections: worth retrying
                error = f"{type(exc).__name__}: {exc}"[:200]
                continue
            if response.status_code == 200:
                try:
                    return _openai_completion(response.json(), chat=path.startswith("chat"))
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    error = f"bad response: {type(exc).__name__}: {exc}"[:200]
                    continue
            error = f"HTTP {response.status_code}: {response.text[:120]}"
            if response.status_code not in RETRY_STATUS:
                break  # a 400/401/404 will not change on retry
        return Completion("", "error", 0, 0, error)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


def _openai_completion(payload: dict[str, Any], chat: bool) -> Completion:
    choice = payload["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    if not isinstance(text, str):
        raise TypeError("completion text is not a string")
    usage = payload.get("usage") or {}
    reason = choice.get("finish_reason") or "stop"
    return Completion(
        text=text,
        finish_reason=reason if reason in ("stop", "length") else "stop",
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
    )
