"""Politeness: how hard one download worker may press one web site, and how rows are spread.

Per domain (a URL's host; or the ``domain_overrides`` entry the host falls under, which then shares
one budget across its subdomains) a worker keeps at most ``max_concurrency`` requests in flight and
draws each request from a token bucket of ``requests_per_s`` (``burst`` tokens deep). A request
that is not allowed yet does not hold a thread: ``RowScheduler`` hands threads the next row of a
domain that *is* ready, so one slow or strict domain never stalls the others. HTTP 429/503 pause
the domain for ``Retry-After`` (seconds or an HTTP-date), or an exponential back-off with jitter
when the server gives none; a row is retried after the pause only if that fits in its deadline,
otherwise it ends ``rate_limited``. A circuit breaker skips a domain after ``failures`` consecutive
connection errors, timeouts or 5xx (rows end ``domain_unavailable``, retryable later) and lets one
probe through after ``cooldown_s``. robots.txt, when asked for, is fetched once per origin through
the same guarded fetch (address policy, deadline, byte cap), cached, and honoured for our agent
(``Crawl-delay`` included); 401/403 forbid everything, other 4xx allow everything, and while it is
unreachable (5xx, timeouts) nothing else is fetched from that origin.

All of this state is per worker process: it lives on the Download stage instance (an actor, so it
outlives one shard), and workers do not share it. A domain can therefore see up to (workers x its
limit); set limits with the worker count in mind. Ingest's ``spread_by_domain`` deals a big domain's
rows over many shards, so that every worker takes its share at the limit, instead of one shard
crawling a domain's whole run at one worker's limit for hours (past the shard deadline).
"""

from __future__ import annotations

import email.utils
import heapq
import itertools
import random
import threading
import time
import urllib.robotparser
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pairsift.stages.base import StageConfig
from pairsift.stages.fetch import (
    BAD_URL,
    DNS_ERROR,
    FAILED,
    REFUSED,
    TIMEOUT,
    FetchRefused,
    FetchResult,
    parse_url,
)

RATE_LIMITED = "rate_limited"
DOMAIN_UNAVAILABLE = "domain_unavailable"
ROBOTS_DISALLOWED = "robots_disallowed"
BACKOFF_STATUSES = frozenset({429, 503})
MAX_PAUSE_S = 86_400.0  # a Retry-After of a year is honoured as a day: the rows end rate_limited anyway
ROBOTS_MAX_BYTES = 512_000  # RFC 9309: parse at least 500 KiB
_IDLE_WAIT_S = 0.5  # a waiting thread re-checks at least this often (a safety net; events wake it)


# ---------------------------------------------------------------------------------------------
# Configuration (nested in DownloadConfig)


class DomainLimits(StageConfig):
    """Limits for one domain, per worker. None means no limit of that kind."""

    max_concurrency: int | None = Field(None, ge=1)
    requests_per_s: float | None = Field(None, gt=0)
    burst: int = Field(1, ge=1)  # tokens a quiet domain saves up; 1 = evenly spaced requests

    def merged(self, override: DomainLimits) -> DomainLimits:
        """This, with the fields ``override`` sets explicitly replacing ours."""
        return self.model_copy(update={name: getattr(override, name) for name in override.model_fields_set})


class BackoffConfig(StageConfig):
    """What a 429/503 does: pause the domain, and retry the row if its deadline allows."""

    base_s: float = Field(1.0, gt=0)  # the first pause when the server sends no Retry-After
    max_s: float = Field(300.0, gt=0)  # the exponential stops growing here
    max_attempts: int = Field(4, ge=1)  # requests per row while the answers are 429/503


class BreakerConfig(StageConfig):
    failures: int | None = Field(10, ge=1)  # consecutive failures that open it; None = never
    cooldown_s: float = Field(60.0, gt=0)  # then one probe request is let through


# ---------------------------------------------------------------------------------------------
# Pure pieces


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; one request spends one token."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def ready_at(self, now: float) -> float:
        """When the next token is there (``now`` if it already is)."""
        self._refill(now)
        missing = 1.0 - self.tokens
        return now if missing <= 1e-9 else now + missing / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


def parse_retry_after(value: str | None, now_wall: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date (RFC 9110 10.2.3).
    None when absent or unreadable; a date in the past means 0."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:  # RFC 9110 dates are always GMT
            return None
        seconds = when.timestamp() - (time.time() if now_wall is None else now_wall)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_PAUSE_S)


def backoff_delay(streak: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential back-off with "equal jitter": somewhere in [d/2, d] for d = base·2^(streak-1),
    so workers that were refused together do not come back together."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(streak - 1, 0), 60))
    return rng.uniform(ceiling / 2, ceiling)


def robots_rules(result: FetchResult) -> urllib.robotparser.RobotFileParser | None:
    """The rules a robots.txt answer sets, or None when the file is unreachable (5xx, timeouts,
    connection errors: try again later, and fetch nothing from the origin meanwhile)."""
    rules = urllib.robotparser.RobotFileParser()
    if result.ok and result.data is not None:
        rules.parse(result.data.decode("utf-8", "replace").splitlines())
    elif result.status in (401, 403):
        rules.disallow_all = True  # urllib's convention: a robots.txt we may not read forbids all
    elif result.status is not None and 400 <= result.status < 500:
        rules.allow_all = True  # RFC 9309: "unavailable" (404 ...) means no rules
    elif result.retryable or result.reason == DNS_ERROR:
        return None
    else:
        rules.allow_all = True  # refused redirect, too large, redirect loop: no rules we can read
    rules.modified()
    return rules


def server_health(result: FetchResult) -> bool | None:
    """True: the server answered; False: it failed (connection error, timeout, 5xx); None: the
    result says nothing about the server (DNS, address policy, a bad URL, a 429)."""
    if result.reason in (DNS_ERROR, REFUSED, BAD_URL) or result.status == 429:
        return None
    if result.reason == TIMEOUT:
        return False
    if result.reason == FAILED and result.retryable and (result.status is None or result.status >= 500):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Per-worker state


@dataclass
class DomainState:
    limits: DomainLimits
    bucket: TokenBucket | None
    in_flight: int = 0
    paused_until: float = 0.0  # no request before this (429/503 back-off)
    backoff_streak: int = 0  # consecutive 429/503 answers
    failures: int = 0  # consecutive failures, for the breaker
    open_until: float | None = None  # breaker: None = closed; open until then, half-open after
    probing: bool = False  # the one half-open probe is in flight

    def breaker(self, now: float) -> str:
        if self.open_until is None:
            return "closed"
        if now < self.open_until:
            return "open"
        return "probing" if self.probing else "probe"

    def idle(self, now: float) -> bool:
        return self.in_flight == 0 and self.open_until is None and self.paused_until <= now


_PENDING = object()  # robots.txt for this origin is being fetched


class Politeness:
    """Everything one worker remembers about domains: limits, buckets, back-off, breakers, robots.

    Not thread-safe on its own: the one ``RowScheduler`` running at a time guards it with its lock."""

    def __init__(
        self,
        per_domain: DomainLimits,
        overrides: dict[str, DomainLimits],
        backoff: BackoffConfig,
        breaker: BreakerConfig,
        respect_robots_txt: bool = False,
        robots_agent: str = "pairsift",
        clock: Callable[[], float] = time.monotonic,
        max_domains: int = 100_000,
        max_robots: int = 10_000,
    ):
        self.per_domain = per_domain
        self.overrides = {domain: per_domain.merged(limits) for domain, limits in overrides.items()}
        self.backoff = backoff
        self.breaker_cfg = breaker
        self.respect_robots_txt = respect_robots_txt
        self.robots_agent = robots_agent
        self.clock = clock
        self.rng = random.Random()  # jitter only: it changes when, never what, is fetched
        self._max_domains = max_domains
        self._max_robots = max_robots
        self._domains: OrderedDict[str, DomainState] = OrderedDict()
        self.robots: OrderedDict[str, Any] = OrderedDict()  # origin -> RobotFileParser | _PENDING

    def key_of(self, host: str) -> str:
        """The domain a host's requests count against: the longest override it falls under, or
        the host itself."""
        if self.overrides:
            labels = host.split(".")
            for start in range(len(labels)):  # longest suffix first: img.cdn.example.com, cdn.example.com ...
                suffix = ".".join(labels[start:])
                if suffix in self.overrides:
                    return suffix
        return host

    def domain(self, key: str) -> DomainState:
        state = self._domains.get(key)
        if state is None:
            limits = self.overrides.get(key, self.per_domain)
            bucket = None
            if limits.requests_per_s is not None:
                bucket = TokenBucket(limits.requests_per_s, limits.burst, self.clock())
            state = self._domains[key] = DomainState(limits, bucket)
            self._evict(self._domains, self._max_domains, lambda s: s.idle(self.clock()))
        else:
            self._domains.move_to_end(key)
        return state

    def remember_robots(self, origin: str, rules: Any) -> None:
        self.robots[origin] = rules
        self.robots.move_to_end(origin)
        self._evict(self.robots, self._max_robots, lambda r: r is not _PENDING)

    @staticmethod
    def _evict(entries: OrderedDict, limit: int, evictable: Callable[[Any], bool]) -> None:
        # Oldest first; a busy entry (in flight, open breaker, robots being fetched) stays, and
        # only a few are looked at per call, so a full table costs O(1) per new entry.
        excess = len(entries) - limit
        if excess <= 0:
            return
        for key in list(itertools.islice(entries, excess + 8)):
            if excess and evictable(entries[key]):
                del entries[key]
                excess -= 1

    def slow_down(self, key: str, crawl_delay: float) -> None:
        """A robots.txt Crawl-delay caps the domain's request rate at one per ``crawl_delay`` s."""
        state = self.domain(key)
        rate = 1.0 / crawl_delay
        if state.bucket is None:
            state.bucket = TokenBucket(rate, 1, self.clock())
        elif rate < state.bucket.rate:
            state.bucket.rate, state.bucket.burst = rate, 1


# ---------------------------------------------------------------------------------------------
# One shard's rows, scheduled over a worker's threads


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
            if ticket.robots and self._p.robots.get(row.origin) is _PENDING:
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
            if rules is _PENDING:
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
            self._p.remember_robots(row.origin, _PENDING)
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


# ---------------------------------------------------------------------------------------------
# Spreading a domain's rows over shards (called by ingest)

_HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/?#]*\]|[^:/?#]*)"


def url_hosts(urls: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Lower-cased host of each url ("" where there is none), vectorised: ingest runs this on
    millions of rows."""
    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    if not pa.types.is_string(urls.type):
        urls = pc.cast(urls, pa.string())
    hosts = pc.struct_field(pc.extract_regex(urls, _HOST), "host")
    return pc.fill_null(pc.utf8_lower(hosts), "")


def spread_by_domain(
    table: pa.Table, n_shards: int, url_column: str = "url", shard_size: int | None = None
) -> pa.Table:
    """Reorder rows so that cutting the result into consecutive shards of ``shard_size`` rows
    (default ceil(rows / n_shards)) gives every shard its share of each domain, instead of one shard
    (one worker) getting a big domain's whole run. A shard holding s of the n rows gets about
    c·s/n of a domain's c rows (within two rows).

    Deterministic: rows of one domain keep their relative order, domains are taken in order of
    first appearance, and inside a shard the rows go round-robin over its domains (first row of
    each, then the second ...), so a downloader walking the shard meets many domains at once."""
    if not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"spread_by_domain: n_shards must be a positive integer, got {n_shards!r}")
    if url_column not in table.column_names:
        raise ValueError(f"spread_by_domain: the table has no {url_column!r} column")
    n = table.num_rows
    if n == 0:
        return table
    size = shard_size or -(-n // n_shards)
    if size < 1 or size * n_shards < n:
        raise ValueError(f"spread_by_domain: {n_shards} shards of {size} rows cannot hold {n} rows")
    ids = np.asarray(url_hosts(table.column(url_column)).dictionary_encode().indices, dtype=np.int64)
    grouped = np.argsort(ids, kind="stable")  # every domain's rows together, in input order
    # Deal the grouped rows over the shards like cards, each shard at the pace of its size: slot i
    # of a shard of length s comes up at (i + 1/2) / s. A domain's run of c rows thus lands about
    # c·s/n in each shard, the short last shard included.
    position = np.arange(n, dtype=np.int64)
    shard = position // size
    index = position - shard * size
    length = np.minimum(size, n - shard * size)
    placed = np.empty(n, dtype=np.int64)
    placed[np.lexsort((shard, (2 * index + 1) / (2 * length)))] = grouped
    domain = ids[placed]
    # Inside a shard each domain's rows are one contiguous run; rank them within their run.
    starts = np.ones(n, dtype=bool)
    starts[1:] = (domain[1:] != domain[:-1]) | (shard[1:] != shard[:-1])
    rank = position - np.maximum.accumulate(np.where(starts, position, 0))
    return table.take(pa.array(placed[np.lexsort((domain, rank, shard))]))
