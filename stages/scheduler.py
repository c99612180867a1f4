"""One shard's rows, scheduled over a download worker's threads as their domains allow.

The domain state it consults and updates (limits, buckets, back-off, breakers, robots.txt) is
``stages.politeness``'s ``Politeness``, which outlives the shard; this module is the per-shard part:
which row a thread takes next, and how each row ends.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pairsift.stages.fetch import FAILED, TIMEOUT, FetchRefused, FetchResult, parse_url
from pairsift.stages.politeness import (
    BACKOFF_STATUSES,
    DOMAIN_UNAVAILABLE,
    RATE_LIMITED,
    ROBOTS_DISALLOWED,
    ROBOTS_PENDING,
    DomainState,
    Politeness,
    backoff_delay,
    parse_retry_after,
    robots_rules,
    server_health,
)

_IDLE_WAIT_S = 0.5  # a waiting thread re-checks at least this often (a safety net; events wake it)


@dataclass
class _Row:
    index: int
    url: str
    key: str
    origin: str
    deadline: float | None = None  # set when the row is first handed out
    not_before: float = 0.0
    retries: int = 0  # transient failures retried (config ``retries``)
    limited: int = 0  # 429/503 answers
    last: FetchResult | None = None


@dataclass
class Ticket:
    """Work for one thread: fetch ``url`` (the row's, or its origin's robots.txt)."""

    row: _Row
    url: str
    robots: bool
    probe: bool
    deadline: float

    @property
    def index(self) -> int:
        return self.row.index


Emit = Callable[[int, FetchResult], None]


class RowScheduler:
    """Hands one shard's rows to threads as their domains allow, and records how each ends.

    Threads loop ``take()`` → fetch → ``finish()``; every row is emitted exactly once, through
    ``emit(index, result)``, either by ``finish`` or directly when it ends without a request
    (breaker open, robots disallow, a back-off longer than its deadline, a bad URL).

    A row's deadline (``row_deadline_s``) starts when it is first handed out and covers every
    attempt and pause after that; rows still queued behind their domain's limits are not charged,
    but one whose domain cannot take a request before a deadline would pass ends ``rate_limited``
    at once. So every domain either moves at least one row per deadline or is finished quickly."""

    def __init__(
        self,
        politeness: Politeness,
        urls: Iterable[Any],
        emit: Emit,
        row_deadline_s: float,
        retries: int = 0,
    ):
        self._p = politeness
        self._emit_result = emit
        self._row_deadline_s = row_deadline_s
        self._retries = retries
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Row]] = {}
        self._ready: deque[str] = deque()  # domains that may be able to send now, round-robin
        self._in_ready: set[str] = set()
        self._timed: list[tuple[float, str]] = []  # (when, domain): domains waiting for a time
        self._unfinished = 0
        self._ended: set[int] = set()
        self._closed = False
        for index, url in enumerate(urls):
            self._unfinished += 1
            try:
                scheme, host, port, _, ip = parse_url(url)
            except FetchRefused as exc:
                self._emit(index, FetchResult(str(url), reason=exc.reason, error=str(exc)))
                continue
            name = str(ip).split("%")[0] if ip is not None else host
            netloc = f"[{name}]" if ":" in name else name
            row = _Row(index, url, politeness.key_of(name), f"{scheme}://{netloc}:{port}")
            self._queues.setdefault(row.key, deque()).append(row)
        for key in self._queues:
            self._mark_ready(key)

    # -- the threads' side --

    def take(self, block: bool = True) -> Ticket | None:
        """The next request a thread may send, waiting while every domain is held back; None when
        every row has ended (or ``close`` was called), or, with ``block=False``, when nothing may
        be sent right now."""
        with self._cond:
            while not self._closed and self._unfinished:
                now = self._p.clock()
                while self._timed and self._timed[0][0] <= now:
                    self._mark_ready(heapq.heappop(self._timed)[1])
                ticket = self._next_ready(now)
                if ticket is not None or not block:
                    return ticket
                wait = self._timed[0][0] - now if self._timed else _IDLE_WAIT_S
                self._cond.wait(min(max(wait, 0.001), _IDLE_WAIT_S))
            return None

    @property
    def unfinished(self) -> int:
        return self._unfinished

    def finish(self, ticket: Ticket, result: FetchResult) -> bool:
        """Record what a ticket's request returned. True when that ended the row; a result with a
        body (a success) always ends it as it is, so its body is then the caller's to pass on."""
        with self._cond:
            now = self._p.clock()
            row = ticket.row
            state = self._p.domain(row.key)
            # First release what the ticket held, so that nothing below can leave the domain
            # blocked for this worker's later shards.
            state.in_flight -= 1
            if ticket.probe:
                state.probing = False
            if ticket.robots and self._p.robots.get(row.origin) is ROBOTS_PENDING:
                del self._p.robots[row.origin]
            self._mark_ready(row.key)
            self._cond.notify_all()
            try:
                self._breaker(state, ticket.probe, server_health(result), now)
                if ticket.robots:
                    return self._robots_done(row, result, now)
                return self._fetched(row, result, now)
            except Exception as exc:  # noqa: BLE001 - a bug here must still end the row
                self._emit(row.index, FetchResult(row.url, reason=FAILED, error=f"scheduler: {exc!r}"))
                return False  # ended, but not with ``result``: its body goes nowhere

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- choosing the next request --

    def _mark_ready(self, key: str) -> None:
        if key not in self._in_ready and self._queues.get(key):
            self._in_ready.add(key)
            self._ready.append(key)

    def _next_ready(self, now: float) -> Ticket | None:
        while self._ready:
            key = self._ready.popleft()
            self._in_ready.discard(key)
            queue = self._queues.get(key)
            if not queue:
                continue
            outcome = self._consider(key, queue, now)
            if isinstance(outcome, Ticket):
                self._mark_ready(key)  # back of the line: domains take turns
                return outcome
            if outcome == "ended":
                self._mark_ready(key)  # its next row may end (or go) right away too
            elif isinstance(outcome, float):
                heapq.heappush(self._timed, (outcome, key))
            # "blocked": in flight at its limit, robots being fetched, a probe out; finish() wakes it
        return None

    def _consider(self, key: str, queue: deque[_Row], now: float) -> Ticket | str | float:
        """Dispatch the domain's next row, end it, or say what the domain waits for: a time, or
        "blocked" on an event (a request in flight finishing)."""
        state = self._p.domain(key)
        head = queue[0]
        gate = self._gate(key, state, head, now)
        if isinstance(gate, FetchResult):
            queue.popleft()
            self._emit(head.index, gate)
            return "ended"
        if gate == "blocked":
            return gate
        ready_at = max(now, state.paused_until, head.not_before)
        if state.bucket is not None:
            ready_at = max(ready_at, state.bucket.ready_at(now))
        if ready_at > now:
            deadline = head.deadline if head.deadline is not None else now + self._row_deadline_s
            if ready_at < deadline:
                return ready_at
            queue.popleft()  # it could not start (again) before its deadline: end it now
            why = "backing off" if state.paused_until > now else "rate-limited"
            message = f"{key} is {why} for {ready_at - now:.1f}s, past the row's deadline"
            self._emit(head.index, self._final(head, message, RATE_LIMITED))
            return "ended"
        return self._dispatch(state, queue, gate == "robots", state.breaker(now) == "probe", now)

    def _gate(self, key: str, state: DomainState, head: _Row, now: float) -> FetchResult | str:
        """What stands before the head row, time aside: "go", "robots" (fetch the origin's
        robots.txt first), "blocked", or the result that ends the row without a request."""
        if head.deadline is not None and now >= head.deadline:
            return self._final(head, "its deadline passed while it waited to go again", TIMEOUT)
        verdict = state.breaker(now)
        if verdict == "open":
            return FetchResult(
                head.url, reason=DOMAIN_UNAVAILABLE, retryable=True,
                error=f"{key} failed {state.failures} times in a row; skipped for "
                      f"{(state.open_until or now) - now:.1f}s more (circuit breaker)")
        if verdict == "probing":
            return "blocked"
        gate = "go"
        if self._p.respect_robots_txt:
            rules = self._p.robots.get(head.origin)
            if rules is ROBOTS_PENDING:
                return "blocked"
            if rules is None:
                gate = "robots"
            elif not rules.can_fetch(self._p.robots_agent, head.url):
                return FetchResult(head.url, reason=ROBOTS_DISALLOWED,
                                   error=f"robots.txt of {head.origin} disallows it for {self._p.robots_agent}")
        limit = state.limits.max_concurrency
        if limit is not None and state.in_flight >= limit:
            return "blocked"
        return gate

    def _dispatch(
        self, state: DomainState, queue: deque[_Row], robots: bool, probe: bool, now: float
    ) -> Ticket:
        row = queue.popleft()
        if state.bucket is not None:
            state.bucket.take(now)
        state.in_flight += 1
        state.probing = state.probing or probe
        if row.deadline is None:
            row.deadline = now + self._row_deadline_s
        url = row.url
        if robots:
            self._p.remember_robots(row.origin, ROBOTS_PENDING)
            url = row.origin + "/robots.txt"
        return Ticket(row, url, robots, probe, row.deadline)

    # -- recording results --

    def _breaker(self, state: DomainState, probe: bool, healthy: bool | None, now: float) -> None:
        if healthy is True:
            state.failures, state.open_until = 0, None
        elif healthy is False:
            state.failures += 1
            threshold = self._p.breaker_cfg.failures
            if probe or (threshold is not None and state.failures >= threshold and state.open_until is None):
                state.open_until = now + self._p.breaker_cfg.cooldown_s
        elif probe:
            state.open_until = now  # the probe told us nothing: the next row probes again

    def _back_off(self, row: _Row, result: FetchResult, now: float) -> bool:
        """A 429/503: pause the domain, then retry the row if it fits. True when the row ended."""
        state = self._p.domain(row.key)
        state.backoff_streak += 1
        cfg = self._p.backoff
        asked = parse_retry_after(result.headers.get("retry-after"))
        # Never sooner than the server asked; repeated refusals grow the pause even when the server
        # keeps asking for one second, so a domain that always refuses ends its rows quickly.
        pause = max(asked or 0.0, backoff_delay(state.backoff_streak, cfg.base_s, cfg.max_s, self._p.rng))
        state.paused_until = max(state.paused_until, now + pause)
        row.limited += 1
        assert row.deadline is not None
        if row.limited >= cfg.max_attempts:
            why = f"HTTP {result.status} {row.limited} times"
        elif now + pause >= row.deadline:
            why = f"a pause of {pause:.1f}s would pass the row's deadline"
        else:
            self._requeue(row, now + pause)
            return False
        self._emit(row.index, self._final(row, why, RATE_LIMITED))
        return True

    def _fetched(self, row: _Row, result: FetchResult, now: float) -> bool:
        row.last = result
        if result.status in BACKOFF_STATUSES:
            return self._back_off(row, result, now)
        if result.status is not None and result.status < 500:
            self._p.domain(row.key).backoff_streak = 0
        assert row.deadline is not None
        transient = result.retryable and result.reason in (TIMEOUT, FAILED)
        if transient and row.retries < self._retries and now < row.deadline:
            row.retries += 1
            self._requeue(row, now)
            return False
        self._emit(row.index, result)
        return True

    def _robots_done(self, row: _Row, result: FetchResult, now: float) -> bool:
        if result.status in BACKOFF_STATUSES:  # not cached: asked again after the pause
            row.last = result
            return self._back_off(row, result, now)
        rules = robots_rules(result)
        if rules is None:  # unreachable: fetch nothing from the origin now, ask again for a later row
            self._emit(row.index, FetchResult(
                row.url, reason=result.reason or FAILED, retryable=True,
                error=f"robots.txt unreachable: {result.error}"))
            return True
        self._p.remember_robots(row.origin, rules)
        delay = rules.crawl_delay(self._p.robots_agent)
        if delay:
            self._p.slow_down(row.key, float(delay))
        self._requeue(row, now)  # the row itself is checked against the rules when it comes round
        return False

    def _requeue(self, row: _Row, not_before: float) -> None:
        row.not_before = not_before
        self._queues[row.key].appendleft(row)  # it has started: its deadline runs, so it goes first
        self._mark_ready(row.key)
        self._cond.notify_all()

    @staticmethod
    def _final(row: _Row, why: str, unanswered: str) -> FetchResult:
        """How a row ends when it stops waiting: its last answer (as ``rate_limited`` when that was
        a 429/503), or ``unanswered`` when it has none."""
        last = row.last
        if last is None:
            return FetchResult(row.url, reason=unanswered, retryable=True, error=why)
        if last.status in BACKOFF_STATUSES:
            return FetchResult(row.url, reason=RATE_LIMITED, retryable=True, status=last.status,
                               error=f"{last.error}; {why}")
        return last

    def _emit(self, index: int, result: FetchResult) -> None:
        if index in self._ended:  # a row ends once, whatever a bug elsewhere might do
            return
        self._ended.add(index)
        self._unfinished -= 1
        self._emit_result(index, result)
        if not self._unfinished:
            self._cond.notify_all()
