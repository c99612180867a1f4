"""Name resolution for fetch: the system resolver, and the per-worker DNS cache in front of it.

Resolving is all this does; what may be dialled is decided on the answers by ``stages.fetch``'s
address policy, so a cached answer is checked as strictly as a fresh one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

Resolver = Callable[[str], list[str]]  # host name -> IP address strings; raises OSError on failure


def system_resolver(host: str) -> list[str]:
    """Resolve with ``socket.getaddrinfo``; bounded by the system resolver's own timeouts."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class CachingResolver:
    """A per-process DNS cache with a TTL; failures are cached too, so dead domains cost one lookup.

    Lookups happen outside the lock, so one slow name cannot stall every other thread, and they are
    single-flight: threads asking for a name that is being looked up wait for that answer instead
    of sending the same query again (a shard's first rows often share a host)."""

    def __init__(self, resolve: Resolver = system_resolver, ttl_s: float = 300.0, max_entries: int = 65536):
        self._resolve = resolve
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, list[str] | OSError]] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, host: str) -> list[str]:
        while True:
            now = time.monotonic()
            with self._lock:
                hit = self._entries.get(host)
                if hit is not None and hit[0] > now:
                    self._entries.move_to_end(host)
                    answer = hit[1]
                    if isinstance(answer, OSError):
                        raise answer
                    return list(answer)
                waiting = self._pending.get(host)
                if waiting is None:
                    lookup = self._pending[host] = threading.Event()
            if waiting is None:
                return self._lookup(host, now, lookup)
            # Bounded by the lookup in flight, itself bounded by the resolver's own timeouts; if it
            # ended without an answer (an unexpected error), this thread looks the name up itself.
            waiting.wait()

    def _lookup(self, host: str, now: float, done: threading.Event) -> list[str]:
        try:
            try:
                answer = self._resolve(host)
            except OSError as exc:
                self._store(host, now, exc)
                raise
            self._store(host, now, list(answer))
            return list(answer)
        finally:
            with self._lock:
                self._pending.pop(host, None)
            done.set()

    def _store(self, host: str, now: float, answer: list[str] | OSError) -> None:
        with self._lock:
            self._entries[host] = (now + self._ttl_s, answer)
            self._entries.move_to_end(host)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
