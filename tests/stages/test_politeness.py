"""The polite downloader against real servers on several loopback addresses, one per "domain".

a.test, b.test and c.test resolve (through an injected resolver) to HostileServers on 127.0.0.2,
127.0.0.3 and 127.0.0.4. Every claim is checked from the servers' side: the request times each
server logged give its request rate and peak concurrency, the gap a Retry-After bought, how many
requests a tripped breaker let through, whether robots.txt was asked for once and a disallowed path
never. Nothing but 127.0.0.0/8 is ever dialled (the ``dialled`` guard refuses anything else).
"""

from __future__ import annotations

import random
import socket
import time
from collections import Counter

import pyarrow as pa
import pytest
from hostile_server import HostileServer
from pydantic import ValidationError

from pairsift.stages.download import Download, DownloadConfig
from pairsift.stages.fetch import FAILED, OPT_OUT, FetchPolicy, FetchResult, fetch
from pairsift.stages.politeness import (
    DomainLimits,
    Politeness,
    TokenBucket,
    backoff_delay,
    parse_retry_after,
)
from pairsift.stages.scheduler import RowScheduler

HOSTS = {"a.test": "127.0.0.2", "b.test": "127.0.0.3", "c.test": "127.0.0.4"}


@pytest.fixture(scope="module")
def servers():
    with HostileServer(host=HOSTS["a.test"], drip_interval_s=0.4) as a, HostileServer(
        host=HOSTS["b.test"]
    ) as b, HostileServer(host=HOSTS["c.test"]) as c:
        yield {"a.test": a, "b.test": b, "c.test": c}


@pytest.fixture
def fresh(servers):
    """The servers with their logs and robots.txt reset, so each test reads only its own requests."""
    for server in servers.values():
        server.timings.clear()
        server.requests.clear()
        server.request_headers.clear()
        server.closed_early.clear()
        server.robots_txt, server.robots_status, server.robots_location = None, 200, None
    return servers


class CountingResolver:
    """Fake DNS for the test names; counts lookups, and fails for anything else (no real DNS)."""

    def __init__(self, extra: dict[str, list[str]] | None = None):
        self.names = {name: [ip] for name, ip in HOSTS.items()} | (extra or {})
        self.calls: Counter[str] = Counter()

    def __call__(self, host: str) -> list[str]:
        self.calls[host] += 1
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, f"fake DNS has no {host}")
        return list(self.names[host])


@pytest.fixture
def dialled(monkeypatch) -> list[str]:
    """Every address a socket connects to; anything outside 127.0.0.0/8 is refused, never dialled."""
    seen: list[str] = []
    real = socket.create_connection

    def create_connection(address, *args, **kwargs):
        seen.append(str(address[0]))
        if not str(address[0]).startswith("127."):
            raise ConnectionRefusedError(f"test guard: refused to dial {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return seen


def url(servers, name: str, path: str) -> str:
    return f"http://{name}:{servers[name].port}{path}"


def make_stage(resolver=None, **overrides) -> Download:
    options = {"allow_loopback": True, "deadline_s": 3.0, "timeout_s": 3.0, "image_size": 32, "thread_count": 8}
    options.update(overrides)
    stage = Download(DownloadConfig(**options), resolver=resolver or CountingResolver())
    stage.setup()
    return stage


def run(stage: Download, urls: list[str]) -> list[dict]:
    table = pa.table({"uid": [f"{i:032x}" for i in range(len(urls))], "url": pa.array(urls, pa.string())})
    return stage(table).select(["url", "reason", "error"]).to_pylist()


def starts(server: HostileServer, prefix: str = "") -> list[float]:
    return sorted(t0 for path, t0, _ in server.timings if path.startswith(prefix))


def peak_concurrency(server: HostileServer) -> int:
    events = sorted([(t0, 1) for _, t0, _ in server.timings] + [(t1, -1) for _, _, t1 in server.timings])
    peak = current = 0
    for _, step in events:  # at equal times an end sorts before a start: touching is not overlapping
        current += step
        peak = max(peak, current)
    return peak


def within_bucket(times: list[float], rate: float, burst: int, slack: float = 0.2) -> bool:
    """True when every run of requests fits a token bucket: requests i..j need
    j - i + 1 <= burst + rate * (t_j - t_i), with ``slack`` seconds for the jitter between sending a
    request and the server's thread logging it (up to a few hundred ms on a loaded 2-core machine;
    the exact schedule is checked with a fake clock in test_scheduler_schedule_on_a_fake_clock)."""
    return all(
        j - i + 1 <= burst + rate * (times[j] - times[i] + slack)
        for i in range(len(times))
        for j in range(i + 1, len(times))
    )


def reasons(rows: list[dict]) -> Counter:
    return Counter(row["reason"] for row in rows)


# --- per-domain concurrency and rate ----------------------------------------------------------


def test_each_server_sees_its_domains_concurrency_and_rate(fresh, dialled):
    stage = make_stage(
        per_domain={"max_concurrency": 2, "requests_per_s": 50},
        domain_overrides={"b.test": {"max_concurrency": 1, "requests_per_s": 5}},
    )
    urls = [url(fresh, "a.test", f"/sleep?s=0.2&i={i}") for i in range(10)]
    urls += [url(fresh, "b.test", f"/ok.jpg?i={i}") for i in range(6)]
    rows = run(stage, urls)
    assert reasons(rows) == {None: 16}
    a, b = fresh["a.test"], fresh["b.test"]
    # a: two at a time, never more (10 requests of 0.2 s: about 1 s at two in flight).
    assert peak_concurrency(a) == 2
    assert within_bucket(starts(a), rate=50, burst=1)
    # b (its override): one at a time, 5 per second: 6 requests span at least 5 gaps of 0.2 s.
    b_times = starts(b)
    assert peak_concurrency(b) == 1
    assert within_bucket(b_times, rate=5, burst=1)
    assert 1.0 - 0.2 <= b_times[-1] - b_times[0] < 1.0 + 1.0  # limited, and not much slower
    # The domains were served side by side: a kept going while b was paced.
    assert sum(b_times[0] < t < b_times[-1] for t in starts(a)) >= 5
    assert set(dialled) == {"127.0.0.2", "127.0.0.3"}


def test_without_limits_the_same_server_sees_more_at_once(fresh):
    # The control for the test above: the same shard without per-domain limits reaches more than
    # two requests in flight on a, so the peak of 2 there is the limiter's doing.
    run(make_stage(), [url(fresh, "a.test", f"/sleep?s=0.2&i={i}") for i in range(10)])
    assert peak_concurrency(fresh["a.test"]) >= 4


def test_token_bucket_burst_then_steady_rate(fresh):
    stage = make_stage(per_domain={"requests_per_s": 4, "burst": 3})
    rows = run(stage, [url(fresh, "c.test", f"/ok.jpg?i={i}") for i in range(7)])
    assert reasons(rows) == {None: 7}
    times = starts(fresh["c.test"])
    assert within_bucket(times, rate=4, burst=3)
    assert (7 - 3) / 4 - 0.2 <= times[-1] - times[0] < (7 - 3) / 4 + 1.0  # then 4 per second


def test_a_strict_domain_does_not_hold_threads_others_could_use(fresh):
    # a's rows come first and a allows 2 requests per second; with two threads, b's rows must still
    # all be served before a's third request: a thread is never parked on a row whose domain waits.
    stage = make_stage(thread_count=2, domain_overrides={"a.test": {"requests_per_s": 2}})
    urls = [url(fresh, "a.test", f"/ok.jpg?i={i}") for i in range(4)]
    urls += [url(fresh, "b.test", f"/sleep?s=0.05&i={i}") for i in range(6)]
    rows = run(stage, urls)
    assert reasons(rows) == {None: 10}
    a_times = starts(fresh["a.test"])
    assert max(t1 for _, _, t1 in fresh["b.test"].timings) < a_times[2]
    assert within_bucket(a_times, rate=2, burst=1)


# --- the scheduler's exact schedule, on a fake clock --------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_scheduler(urls: list[str], row_deadline_s: float = 10.0, **cfg):
    clock = FakeClock()
    config = DownloadConfig(**cfg)
    polite = Politeness(config.per_domain, config.domain_overrides, config.backoff, config.breaker, clock=clock)
    emitted: dict[int, FetchResult] = {}
    scheduler = RowScheduler(polite, urls, emitted.__setitem__, row_deadline_s)
    return scheduler, clock, emitted


def drain(scheduler: RowScheduler) -> list:
    """Every ticket the scheduler hands out at the current (fake) time."""
    tickets = []
    while (ticket := scheduler.take(block=False)) is not None:
        tickets.append(ticket)
    return tickets


def names(tickets) -> list[str]:
    return [t.url.removeprefix("http://").replace(".test/", "") for t in tickets]


OK = FetchResult("x", data=b"image", status=200)
DEAD = FetchResult("x", reason=FAILED, error="ConnectionRefusedError", retryable=True)


def test_scheduler_schedule_on_a_fake_clock():
    urls = [f"http://a.test/{i}" for i in range(4)] + [f"http://b.test/{i}" for i in range(3)]
    scheduler, clock, emitted = fake_scheduler(
        urls,
        per_domain={"max_concurrency": 2, "requests_per_s": 5},
        domain_overrides={"b.test": {"max_concurrency": 1, "requests_per_s": 10}},
    )
    first = drain(scheduler)
    assert names(first) == ["a0", "b0"]  # one token each; the domains take turns
    clock.now = 0.05
    scheduler.finish(first[1], OK)
    assert drain(scheduler) == []  # b is free again, but its next token comes at 0.1
    clock.now = 0.1
    b1 = drain(scheduler)
    assert names(b1) == ["b1"]
    clock.now = 0.2
    assert names(drain(scheduler)) == ["a1"]  # a's second token
    clock.now = 0.4
    assert drain(scheduler) == []  # a has a token but two requests in flight; b has one
    scheduler.finish(first[0], OK)
    scheduler.finish(b1[0], OK)
    assert names(drain(scheduler)) == ["a2", "b2"]
    assert sorted(emitted) == [0, 4, 5] and scheduler.unfinished == 4


def test_scheduler_burst_on_a_fake_clock():
    scheduler, clock, _ = fake_scheduler(
        [f"http://c.test/{i}" for i in range(6)], per_domain={"requests_per_s": 4, "burst": 3}
    )
    assert len(drain(scheduler)) == 3  # the saved tokens go at once
    for now, expected in [(0.24, 0), (0.25, 1), (0.49, 0), (0.5, 1), (10.0, 1)]:
        clock.now = now
        assert len(drain(scheduler)) == expected, now


def test_scheduler_retry_after_on_a_fake_clock():
    urls = ["http://a.test/0", "http://a.test/1", "http://b.test/0", "http://b.test/1"]
    scheduler, clock, emitted = fake_scheduler(urls, per_domain={"max_concurrency": 1})
    a0, b0 = drain(scheduler)
    clock.now = 0.1
    refused = FetchResult(a0.url, reason=FAILED, status=429, headers={"retry-after": "1"}, retryable=True)
    assert scheduler.finish(a0, refused) is False  # paused, to be retried
    scheduler.finish(b0, OK)
    assert names(drain(scheduler)) == ["b1"]  # the other domain goes on
    clock.now = 1.09
    assert drain(scheduler) == []
    clock.now = 1.1
    assert names(drain(scheduler)) == ["a0"]  # the refused row first: its deadline is running
    assert 0 not in emitted


def test_scheduler_rate_limited_rows_end_without_waiting_past_their_deadline():
    urls = ["http://a.test/0", "http://a.test/1", "http://b.test/0"]
    scheduler, clock, emitted = fake_scheduler(urls, row_deadline_s=5.0, per_domain={"max_concurrency": 1})
    a0, b0 = drain(scheduler)
    far = FetchResult(a0.url, reason=FAILED, status=503, headers={"retry-after": "60"}, retryable=True)
    assert scheduler.finish(a0, far) is True  # 60 s > its 5 s deadline: it ends now
    assert drain(scheduler) == []  # and a/1, which could not start within a deadline, ends too
    assert (emitted[0].reason, emitted[1].reason) == ("rate_limited", "rate_limited")
    assert 2 not in emitted and scheduler.unfinished == 1


def test_scheduler_breaker_on_a_fake_clock():
    urls = [f"http://a.test/{i}" for i in range(6)]
    scheduler, clock, emitted = fake_scheduler(
        urls, per_domain={"max_concurrency": 1}, breaker={"failures": 2, "cooldown_s": 5}
    )
    for _ in range(2):
        (ticket,) = drain(scheduler)
        scheduler.finish(ticket, DEAD)
    assert drain(scheduler) == []  # open: the other four rows end without a request
    assert [emitted[i].reason for i in range(6)] == ["failed_to_download"] * 2 + ["domain_unavailable"] * 4

    scheduler, clock, emitted = fake_scheduler(
        urls, per_domain={"max_concurrency": 3}, breaker={"failures": 1, "cooldown_s": 5}
    )
    (opener, *others) = drain(scheduler)
    scheduler.finish(opener, DEAD)  # opens it; the two requests already out finish normally
    for ticket in others:
        scheduler.finish(ticket, DEAD)
    clock.now = 4.9
    assert drain(scheduler) == [] and emitted[3].reason == "domain_unavailable"
    scheduler, clock, emitted = fake_scheduler(
        urls, per_domain={"max_concurrency": 3}, breaker={"failures": 1, "cooldown_s": 5}
    )
    scheduler.finish(drain(scheduler)[0], DEAD)
    clock.now = 5.0  # nothing was skipped yet; after the cool-down exactly one probe goes
    tickets = drain(scheduler)
    assert [t.probe for t in tickets] == [True] and drain(scheduler) == []
    scheduler.finish(tickets[0], OK)  # it succeeds: closed, the concurrency limit applies again
    assert len(drain(scheduler)) == 3 - 2  # two of the first three are still in flight


def test_scheduler_survives_a_result_it_cannot_read():
    # A malformed result (no headers on a 429) must end its row and leave the domain usable.
    scheduler, clock, emitted = fake_scheduler(["http://a.test/0", "http://a.test/1"],
                                               per_domain={"max_concurrency": 1})
    (ticket,) = drain(scheduler)
    scheduler.finish(ticket, FetchResult(ticket.url, reason=FAILED, status=429, headers=None))
    assert emitted[0].reason == "failed_to_download" and "scheduler" in emitted[0].error
    (ticket,) = drain(scheduler)  # the domain is not left blocked
    scheduler.finish(ticket, OK)
    assert emitted[1] is OK and scheduler.unfinished == 0


def test_domain_state_is_bounded_and_keeps_busy_domains():
    config = DownloadConfig(per_domain={"requests_per_s": 1})
    polite = Politeness(config.per_domain, {}, config.backoff, config.breaker, max_domains=3)
    polite.domain("busy.test").in_flight = 1
    for name in ["a.test", "b.test", "c.test", "d.test"]:
        polite.domain(name)
    assert list(polite._domains) == ["busy.test", "c.test", "d.test"]


# --- 429/503 back-off ----------------------------------------------------------------------------


@pytest.mark.parametrize("after, low, high", [("1", 1.0, 1.9), ("date:2", 1.0, 2.9)])
def test_retry_after_pauses_only_its_domain(fresh, after, low, high):
    """A 429 with Retry-After (seconds, or an HTTP-date: whole seconds, so 1-2 s for "2 s ahead")
    pauses a.test for that long; the row is retried after it; b.test is served meanwhile."""
    key = f"ra{time.monotonic_ns()}"
    stage = make_stage(per_domain={"max_concurrency": 1}, backoff={"base_s": 0.2})
    urls = [url(fresh, "a.test", f"/flaky?key={key}&fail=1&code=429&after={after}")]
    urls += [url(fresh, "a.test", f"/ok.jpg?i={i}") for i in range(2)]
    urls += [url(fresh, "b.test", f"/sleep?s=0.1&i={i}") for i in range(4)]
    rows = run(stage, urls)
    assert reasons(rows) == {None: 7}
    a = fresh["a.test"].timings
    refused_at = min(t0 for path, t0, _ in a)
    after_pause = sorted(t0 for _, t0, _ in a if t0 > refused_at)
    assert len(after_pause) == 3  # the retry and the two other rows, all after the pause
    assert low - 0.02 <= after_pause[0] - refused_at < high
    # b (one at a time, 0.1 s each) was not paused with a: its requests went on during a's pause.
    assert any(refused_at < t < refused_at + low for t in starts(fresh["b.test"]))


def test_retry_after_past_the_deadline_ends_the_domains_rows_at_once(fresh):
    key = f"far{time.monotonic_ns()}"
    stage = make_stage(deadline_s=2.0, per_domain={"max_concurrency": 1})
    urls = [url(fresh, "a.test", f"/flaky?key={key}&fail=99&code=429&after=60")]
    urls += [url(fresh, "a.test", f"/ok.jpg?i={i}") for i in range(3)]
    urls += [url(fresh, "b.test", f"/ok.jpg?i={i}") for i in range(3)]
    started = time.monotonic()
    rows = run(stage, urls)
    assert time.monotonic() - started < 1.0  # nobody waited for the 60 s
    assert [r["reason"] for r in rows] == ["rate_limited"] * 4 + [None] * 3
    assert "429" in rows[0]["error"] and "past the row's deadline" in rows[1]["error"]
    assert len(fresh["a.test"].timings) == 1  # the other a rows were never sent


def test_503_without_retry_after_backs_off_exponentially_with_jitter(fresh):
    key = f"exp{time.monotonic_ns()}"
    stage = make_stage(backoff={"base_s": 0.3})
    rows = run(stage, [url(fresh, "a.test", f"/flaky?key={key}&fail=2&code=503")])
    assert rows[0]["reason"] is None
    times = starts(fresh["a.test"])
    assert len(times) == 3
    first, second = times[1] - times[0], times[2] - times[1]
    assert 0.15 - 0.02 <= first < 0.3 + 0.5  # in [base/2, base] (plus scheduling slack)
    assert 0.3 - 0.02 <= second < 0.6 + 0.5  # in [base, 2 base]


def test_a_row_stops_after_max_attempts_of_429(fresh):
    key = f"max{time.monotonic_ns()}"
    stage = make_stage(backoff={"base_s": 0.05, "max_attempts": 2})
    rows = run(stage, [url(fresh, "a.test", f"/flaky?key={key}&fail=99&code=429")])
    assert rows[0]["reason"] == "rate_limited" and "2 times" in rows[0]["error"]
    assert len(fresh["a.test"].timings) == 2


def test_transient_failures_are_retried_within_the_row_deadline(fresh):
    key = f"t{time.monotonic_ns()}"
    rows = run(make_stage(retries=1), [url(fresh, "a.test", f"/flaky?key={key}&fail=1&code=500")])
    assert rows[0]["reason"] is None and len(fresh["a.test"].timings) == 1 + 1
    # A dripping body: each attempt is cut by what is left of the row's 1 s, not a fresh deadline.
    stage = make_stage(retries=5, deadline_s=0.6, row_deadline_s=1.0)
    started = time.monotonic()
    rows = run(stage, [url(fresh, "a.test", "/drip")])
    assert rows[0]["reason"] == "timeout"
    assert 1.0 - 0.05 < time.monotonic() - started < 1.0 + 0.6
    assert fresh["a.test"].requests.count("/drip") == 2  # 0.6 s, then the 0.4 s left


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now_wall=now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now_wall=now) == 0.0  # in the past
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("99999999") == 86_400.0
    for junk in (None, "", "soon", "nan", "Tue, 14 Nov 2023 25:99:00"):
        assert parse_retry_after(junk) is None


def test_backoff_delay_doubles_within_its_jitter_and_caps():
    rng = random.Random(0)
    for streak in range(1, 12):
        ceiling = min(10.0, 0.5 * 2 ** (streak - 1))
        for _ in range(50):
            assert ceiling / 2 <= backoff_delay(streak, 0.5, 10.0, rng) <= ceiling
    draws = {round(backoff_delay(3, 1.0, 60.0, rng), 6) for _ in range(20)}
    assert len(draws) > 10  # jittered, not a fixed value


def test_token_bucket_arithmetic():
    bucket = TokenBucket(rate=4.0, burst=2, now=0.0)
    assert bucket.ready_at(0.0) == 0.0
    bucket.take(0.0)
    bucket.take(0.0)
    assert bucket.ready_at(0.0) == pytest.approx(0.25)
    assert bucket.ready_at(0.1) == pytest.approx(0.25)
    assert bucket.ready_at(10.0) == 10.0  # refilled, but never above the burst:
    bucket.take(10.0)
    bucket.take(10.0)
    assert bucket.ready_at(10.0) == pytest.approx(10.25)


# --- circuit breaker -----------------------------------------------------------------------------


def test_breaker_skips_a_failing_domain_then_probes_after_the_cooldown(fresh):
    stage = make_stage(
        breaker={"failures": 3, "cooldown_s": 1.0}, domain_overrides={"c.test": {"max_concurrency": 1}}
    )
    c = fresh["c.test"]
    urls = [url(fresh, "c.test", f"/status/500?i={i}") for i in range(12)]
    urls += [url(fresh, "b.test", f"/ok.jpg?i={i}") for i in range(4)]
    rows = run(stage, urls)
    assert [r["reason"] for r in rows[:3]] == ["failed_to_download"] * 3
    assert [r["reason"] for r in rows[3:12]] == ["domain_unavailable"] * 9
    assert "circuit breaker" in rows[3]["error"]
    assert [r["reason"] for r in rows[12:]] == [None] * 4  # another domain is not affected
    assert len(c.timings) == 3  # exactly the failures that opened it

    # The next shard on the same worker, inside the cool-down: nothing is sent.
    rows = run(stage, [url(fresh, "c.test", f"/status/500?j={i}") for i in range(3)])
    assert reasons(rows) == {"domain_unavailable": 3} and len(c.timings) == 3
    # After the cool-down one probe goes; it fails, so the breaker opens again for the rest.
    time.sleep(1.05)
    rows = run(stage, [url(fresh, "c.test", f"/status/500?k={i}") for i in range(5)])
    assert reasons(rows) == {"failed_to_download": 1, "domain_unavailable": 4}
    assert len(c.timings) == 4
    # After the next cool-down the probe succeeds and the domain is served again.
    time.sleep(1.05)
    rows = run(stage, [url(fresh, "c.test", f"/ok.jpg?k={i}") for i in range(5)])
    assert reasons(rows) == {None: 5} and len(c.timings) == 9


def test_breaker_counts_connection_errors(dialled):
    # Nothing listens on this port of 127.0.0.5: every connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.5", 0))
        port = probe.getsockname()[1]
    resolver = CountingResolver({"dead.test": ["127.0.0.5"]})
    stage = make_stage(
        resolver, breaker={"failures": 3, "cooldown_s": 60}, per_domain={"max_concurrency": 1}
    )
    rows = run(stage, [f"http://dead.test:{port}/x{i}.jpg" for i in range(10)])
    assert reasons(rows) == {"failed_to_download": 3, "domain_unavailable": 7}
    assert dialled == ["127.0.0.5"] * 3


def test_client_errors_do_not_trip_the_breaker(fresh):
    stage = make_stage(breaker={"failures": 2, "cooldown_s": 60})
    rows = run(stage, [url(fresh, "a.test", f"/404?i={i}") for i in range(6)])
    assert reasons(rows) == {"failed_to_download": 6}
    assert len(fresh["a.test"].timings) == 6  # a site that answers 404 is alive: every row was tried


# --- robots.txt ----------------------------------------------------------------------------------

ROBOTS = "User-agent: pairsift-test-bot\nDisallow: /ok.png\n\nUser-agent: *\nDisallow: /\n"


def test_robots_txt_is_fetched_once_and_honoured_for_our_agent(fresh, dialled):
    a = fresh["a.test"]
    a.robots_txt = ROBOTS
    stage = make_stage(respect_robots_txt=True, user_agent_token="pairsift-test-bot")
    urls = [url(fresh, "a.test", p) for p in ["/ok.jpg?i=1", "/ok.png?i=1", "/ok.jpg?i=2", "/ok.png?i=2"]]
    rows = run(stage, urls)
    assert [r["reason"] for r in rows] == [None, "robots_disallowed"] * 2
    assert a.requests.count("/robots.txt") == 1
    assert not any(p.startswith("/ok.png") for p in a.requests)  # a disallowed url is never sent
    # The next shard on this worker uses the cached rules.
    rows = run(stage, [url(fresh, "a.test", "/ok.jpg?i=3"), url(fresh, "a.test", "/ok.png?i=3")])
    assert [r["reason"] for r in rows] == [None, "robots_disallowed"]
    assert a.requests.count("/robots.txt") == 1
    # Another agent falls under "*": everything is disallowed for it.
    other = make_stage(respect_robots_txt=True, user_agent_token="other-bot")
    assert reasons(run(other, [url(fresh, "a.test", "/ok.jpg?i=4")])) == {"robots_disallowed": 1}
    # Off by default: no robots.txt request, and the path is fetched.
    before = a.requests.count("/robots.txt")
    assert reasons(run(make_stage(), [url(fresh, "a.test", "/ok.png?i=5")])) == {None: 1}
    assert a.requests.count("/robots.txt") == before
    assert set(dialled) == {"127.0.0.2"}


def test_robots_txt_goes_through_the_address_policy(fresh, dialled):
    # A robots.txt that redirects to the cloud metadata address: refused before any connection;
    # with no rules to read the rows are fetched (the image urls pass the policy on their own).
    fresh["a.test"].robots_location = "http://metadata.test/latest/meta-data/"
    resolver = CountingResolver({"metadata.test": ["169.254.169.254"]})
    stage = make_stage(resolver, respect_robots_txt=True)
    rows = run(stage, [url(fresh, "a.test", f"/ok.jpg?i={i}") for i in range(3)])
    assert reasons(rows) == {None: 3}
    assert set(dialled) == {"127.0.0.2"}
    assert fresh["a.test"].requests.count("/robots.txt") == 1


def test_unreachable_robots_txt_fetches_nothing_from_the_origin(fresh):
    b = fresh["b.test"]
    b.robots_txt, b.robots_status = "oops", 500
    stage = make_stage(respect_robots_txt=True, per_domain={"max_concurrency": 1}, breaker={"failures": 2})
    rows = run(stage, [url(fresh, "b.test", f"/ok.jpg?i={i}") for i in range(4)])
    assert [r["reason"] for r in rows] == ["failed_to_download"] * 2 + ["domain_unavailable"] * 2
    assert "robots.txt unreachable" in rows[0]["error"]
    assert set(b.requests) == {"/robots.txt"}  # asked again for the next row, never an image


def test_robots_crawl_delay_slows_the_domain(fresh):
    c = fresh["c.test"]
    c.robots_txt = "User-agent: *\nCrawl-delay: 1\nDisallow: /private/\n"
    stage = make_stage(respect_robots_txt=True)
    rows = run(stage, [url(fresh, "c.test", f"/ok.jpg?i={i}") for i in range(3)])
    assert reasons(rows) == {None: 3}
    images = starts(c, "/ok.jpg")
    assert within_bucket(images, rate=1.0, burst=1)
    assert images[-1] - images[0] >= 2.0 - 0.2


# --- opt-out headers stop the body --------------------------------------------------------------


@pytest.mark.parametrize("query", ["tag=noai", "tag=noimageai", "tag=noml", "tdm=1"])
def test_opt_out_headers_end_the_request_before_the_body(fresh, query):
    """The body drips one byte per 0.4 s after the headers: an opt-out must end the request in less
    than one drip, and the server must find the connection closed before sending the body."""
    a = fresh["a.test"]
    target = url(fresh, "a.test", f"/optout-drip?{query}")
    started = time.monotonic()
    result = fetch(target, FetchPolicy(allow_loopback=True, deadline_s=5.0), CountingResolver())
    assert time.monotonic() - started < a.drip_interval_s
    assert result.reason == OPT_OUT and result.data is None
    size = len(a.images["ok.jpg"])
    for _ in range(40):  # the server notices on its next writes, a drip or two later
        if a.closed_early:
            break
        time.sleep(0.1)
    assert a.closed_early and a.closed_early[0][1] < 4 < size

    rows = run(make_stage(), [target + "&stage=1"])
    assert rows[0]["reason"] == "opt_out"


# --- DNS -----------------------------------------------------------------------------------------


def test_each_host_is_resolved_once_per_worker(fresh):
    resolver = CountingResolver()
    stage = make_stage(resolver)
    urls = [url(fresh, name, f"/ok.jpg?i={i}") for i in range(8) for name in ("a.test", "b.test")]
    urls += [f"http://nowhere.test/{i}.jpg" for i in range(6)]
    rows = run(stage, urls)
    assert reasons(rows) == {None: 16, "dns_error": 6}  # not a dead link: its own reason
    assert "cannot resolve" in rows[-1]["error"]
    assert resolver.calls == {"a.test": 1, "b.test": 1, "nowhere.test": 1}  # 8 threads, one lookup each
    run(stage, urls)  # the next shard on this worker: answers and failures are still cached
    assert resolver.calls == {"a.test": 1, "b.test": 1, "nowhere.test": 1}


def test_dns_answers_expire_after_their_ttl(fresh):
    resolver = CountingResolver()
    stage = make_stage(resolver, dns_ttl_s=0)  # expired as soon as stored: every shard asks again
    urls = [url(fresh, "a.test", "/ok.jpg?ttl"), url(fresh, "b.test", "/ok.jpg?ttl")]
    for _ in range(2):
        assert reasons(run(stage, urls)) == {None: 2}
    assert resolver.calls == {"a.test": 2, "b.test": 2}


# --- config -------------------------------------------------------------------------------------


def test_overrides_cover_subdomains_and_keep_unset_global_limits():
    cfg = DownloadConfig(
        per_domain={"max_concurrency": 4, "requests_per_s": 10},
        domain_overrides={"Example.COM.": {"requests_per_s": 1}},
    )
    assert list(cfg.domain_overrides) == ["example.com"]
    polite = cfg.politeness()
    assert polite.key_of("img.example.com") == polite.key_of("example.com") == "example.com"
    assert polite.key_of("notexample.com") == "notexample.com"
    limits = polite.domain("example.com").limits
    assert (limits.max_concurrency, limits.requests_per_s) == (4, 1)
    assert polite.domain("other.org").limits == DomainLimits(max_concurrency=4, requests_per_s=10)
    assert DownloadConfig().row_deadline == 30.0 and DownloadConfig(retries=2).row_deadline == 90.0
    # Workers rebuild the config from model_dump(): the limits must mean the same there.
    rebuilt = DownloadConfig(**cfg.model_dump()).politeness()
    assert rebuilt.domain(rebuilt.key_of("img.example.com")).limits == limits
    assert rebuilt.domain("other.org").limits == polite.domain("other.org").limits


@pytest.mark.parametrize(
    "bad",
    [
        {"per_domain": {"max_concurrency": 0}},
        {"per_domain": {"requests_per_s": -1}},
        {"per_domain": {"rate": 5}},
        {"domain_overrides": {"http://example.com/": {"requests_per_s": 1}}},
        {"domain_overrides": {"": {}}},
        {"backoff": {"max_attempts": 0}},
        {"breaker": {"failures": 0}},
        {"row_deadline_s": 0},
    ],
)
def test_bad_politeness_config_is_refused_when_built(bad):
    with pytest.raises(ValidationError):
        DownloadConfig(**bad)
