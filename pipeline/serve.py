"""Serve a synthetic corpus's `web/` folder on a loopback address, so the real download path runs.

    with serve(corpus_dir, port=port) as server:   # port from free_port(), also given to synthesize
        download(server.url + "/img/...")

Only loopback hosts are accepted: the corpus is test data and nothing else should reach it; a
symlink is served only while it points inside `web/`.
Missing files and directories answer 404; nothing is logged per request.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from pairsift.common import ray_local
from pairsift.pipeline.errors import UserError

CONTENT_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".gif": "image/gif", ".txt": "text/plain; charset=utf-8", ".json": "application/json",
    ".html": "text/html; charset=utf-8",
}


class NotLoopback(UserError, ValueError):
    """A host that is not a loopback address (the CLI prints it as one line and exits 2)."""


def _loopback(host: str) -> str:
    """The host if it is a loopback address ("localhost" means 127.0.0.1); NotLoopback otherwise."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise NotLoopback(f"refusing to serve on {host!r}: only loopback addresses (127.0.0.0/8, ::1) are allowed")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on the loopback ``host`` right now."""
    return ray_local.free_port(_loopback(host))


def _inside(path: str, directory: str) -> bool:
    """Whether ``path``, every symlink resolved, lies in ``directory``."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: downloaders reuse connections
    extensions_map: ClassVar[dict[str, str]] = {**SimpleHTTPRequestHandler.extensions_map, **CONTENT_TYPES}

    def send_head(self) -> Any:
        # A directory is not a resource of the fake web: no listings, no redirect to "dir/". A
        # symlink is followed only while it stays inside the served folder.
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not _inside(path, self.directory):
            self.send_error(404, "Not found")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class WebServer:
    """A running server; `.url` is its base URL. Close it, or use it as a context manager."""

    def __init__(self, httpd: ThreadingHTTPServer, host: str):
        self._httpd = httpd
        self.host = host
        self.port = int(httpd.server_address[1])
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        self._thread = threading.Thread(target=httpd.serve_forever, name=f"synth-web-{self.port}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _web_dir(directory: Path) -> Path:
    web = Path(directory) / "web"
    if not web.is_dir():
        raise UserError(f"{web} does not exist: run `pairsift synth {directory}` first")
    return web


def serve(directory: Path, host: str = "127.0.0.1", port: int = 0) -> WebServer:
    """Serve `<directory>/web/` on http://host:port in a daemon thread (port 0 = any free port)."""
    host = _loopback(host)
    web = _web_dir(directory)
    server_class = _Server6 if ":" in host else _Server
    try:
        httpd = server_class((host, port), partial(_Handler, directory=str(web)))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return WebServer(httpd, host)


def serve_forever(directory: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C, printing the base URL first (for `pairsift serve`)."""
    server = serve(directory, host, port)
    try:
        print(f"serving {_web_dir(directory)} at {server.url} (Ctrl-C to stop)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
