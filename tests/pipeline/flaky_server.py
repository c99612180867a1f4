"""A real HTTP server on 127.0.0.1 whose chosen paths fail until the test heals them.

``/img/<n>.jpg`` is a small JPEG drawn from ``n`` (the same bytes every time, so two runs can be
compared). A path listed in ``failing`` misbehaves in its mode until ``heal()``:

    "500"   HTTP 500                                  -> failed_to_download
    "503"   HTTP 503 (a back-off status)               -> rate_limited once its attempts are spent
    "drop"  closes the connection without an answer    -> failed_to_download
    "slow"  waits ``slow_s`` (or until healed) to answer -> timeout (with a shorter deadline)

Every request's path is logged in order in ``requests``, so a test can tell exactly what was asked.
"""

from __future__ import annotations

import io
import socket
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from PIL import Image, ImageDraw

MODES = ("500", "503", "drop", "slow")


@cache
def image_bytes(n: int) -> bytes:
    """A JPEG for sample n; every 7th is 16x16, the rest 48x40."""
    size = (16, 16) if n % 7 == 0 else (48, 40)
    image = Image.new("RGB", size, ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256))
    ImageDraw.Draw(image).ellipse([2, 2, size[0] // 2 + n % 10, size[1] // 2], fill=(255 - n % 256, 40, 90))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections from a downloader's burst of threads


class FlakyServer:
    def __init__(self, failing: dict[str, str], slow_s: float = 3.0):
        assert set(failing.values()) <= set(MODES), failing
        self.failing = dict(failing)
        self.slow_s = slow_s
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._healed = threading.Event()  # wakes slow answers still sleeping when the test heals
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def heal(self, paths: list[str] | None = None) -> None:
        """The listed paths (all by default) answer normally from now on."""
        with self._lock:
            for path in list(self.failing) if paths is None else paths:
                self.failing.pop(path, None)
            if not self.failing:
                self._healed.set()

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests.count(path)

    def _mode(self, path: str) -> str | None:
        with self._lock:
            self.requests.append(path)
            return self.failing.get(path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                mode = server._mode(self.path)
                if mode == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if mode in ("500", "503"):
                    self.send_response(int(mode))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode == "slow":
                    server._healed.wait(server.slow_s)
                try:
                    n = int(self.path.removeprefix("/img/").removesuffix(".jpg"))
                except ValueError:
                    self.send_error(404)
                    return
                body = image_bytes(n)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow answer: expected

        return Handler

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
