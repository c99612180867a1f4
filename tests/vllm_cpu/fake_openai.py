"""A small real HTTP server on 127.0.0.1 that speaks the OpenAI JSON of ``vllm serve``.

``POST /v1/completions`` and ``POST /v1/chat/completions``; the reply text comes from a function
of the request body, then ``stop`` and ``max_tokens`` (counted in words) are applied the way the
real server does (stop strings excluded; ``finish_reason`` "stop" or "length"). Misbehaviour on
demand, keyed by a substring of the prompt: ``fail_first`` (that many 503s first), ``hang`` (no
answer until the server stops), ``reject`` (400). Every request and the peak number in flight are
recorded for the tests. Imported by file path (see tiny_lm.py for why).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt of a completions body, or the text parts of a chat body's last message."""
    if "prompt" in body:
        return str(body["prompt"])
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def chat_images(body: dict[str, Any]) -> list[str]:
    """The image data URLs of a chat body's last message."""
    content = body.get("messages", [{}])[-1].get("content", "")
    if isinstance(content, str):
        return []
    return [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]


class FakeVllmServe:
    def __init__(self, reply: Callable[[dict[str, Any]], str], delay_s: float = 0.0):
        self.reply = reply
        self.delay_s = delay_s
        self.fail_first: dict[str, int] = {}
        self.hang: set[str] = set()
        self.reject: set[str] = set()
        self.requests: list[dict[str, Any]] = []
        self.paths: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight = 0
        self._failed: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeVllmServe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _respond(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        text = prompt_text(body)
        with self._lock:
            self.requests.append(body)
            self.paths[path] += 1
        if any(key in text for key in self.hang):
            self._stopping.wait(60)  # until the server stops: the client's timeout must fire first
            return 503, {"error": "stopped"}
        if any(key in text for key in self.reject):
            return 400, {"error": {"message": "bad request"}}
        for key, times in self.fail_first.items():
            if key in text:
                with self._lock:
                    self._failed[key] += 1
                    if self._failed[key] <= times:
                        return 503, {"error": "overloaded"}
        if self.delay_s:
            time.sleep(self.delay_s)
        out = self.reply(body)
        finish = "stop"
        cuts = [i for i in (out.find(s) for s in body.get("stop") or []) if i >= 0]
        if cuts:
            out = out[: min(cuts)]
        words = out.split(" ")
        if len(words) > body["max_tokens"]:
            out, finish = " ".join(words[: body["max_tokens"]]), "length"
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(out.split())}
        if path.endswith("chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": out, "finish_reason": finish}
        return 200, {"id": "cmpl-fake", "model": body.get("model"), "choices": [choice], "usage": usage}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                with fake._lock:
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    if self.path not in ("/v1/completions", "/v1/chat/completions"):
                        status, payload = 404, {"error": "not found"}
                    else:
                        length = int(self.headers.get("Content-Length", 0))
                        status, payload = fake._respond(self.path, json.loads(self.rfile.read(length)))
                finally:
                    with fake._lock:
                        fake.inflight -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout) before the answer
                    pass

        return Handler
