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
limit); set limits with the worker count in mind. Ingest's ``spread_by_domain`` (stages/spread.py) deals a big domain's
rows over many shards, so that every worker takes its share at the limit, instead of one shard
crawling a domain's whole run at one worker's limit for hours (past the shard deadline).
"""

from __future__ import annotations

import email.utils
import itertools
import random
import time
import urllib.robotparser
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from pairsift.stages.base import StageConfig
from pairsift.stages.fetch import BAD_URL, DNS_ERROR, FAILED, REFUSED, TIMEOUT, FetchResult

RATE_LIMITED = "rate_limited"
DOMAIN_UNAVAILABLE = "domain_unavailable"
ROBOTS_DISALLOWED = "robots_disallowed"
BACKOFF_STATUSES = frozenset({429, 503})
MAX_PAUSE_S = 86_400.0  # a Retry-After of a year is honoured as a day: the rows end rate_limited anyway
ROBOTS_MAX_BYTES = 512_000  # RFC 9309: parse at least 500 KiB


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


ROBOTS_PENDING = object()  # robots.txt for this origin is being fetched


class Politeness:
    """Everything one worker remembers about domains: limits, buckets, back-off, breakers, robots.

    Not thread-safe on its own: the one ``RowScheduler`` (stages/scheduler.py) running at a time guards it with its lock."""

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
        self.robots: OrderedDict[str, Any] = OrderedDict()  # origin -> RobotFileParser | ROBOTS_PENDING

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
        self._evict(self.robots, self._max_robots, lambda r: r is not ROBOTS_PENDING)

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
