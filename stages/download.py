"""The download stage: fetch every row's ``url``, check it is a sane image, resize and re-encode it.

Fetching is ``stages.fetch`` (address policy, deadline, byte cap, opt-outs); resizing and encoding
is img2dataset's ``Resizer``, so resize modes and output bytes match what img2dataset users know.
Between the two sits a cheap inspection of the header (``stages.image_inspect``): markup, unknown
bytes or a format pairsift does not decode are ``not_an_image``, and a declared size above
``max_pixels`` is ``image_too_large`` before a single pixel is decoded. Images with an EXIF rotation,
or in formats OpenCV cannot read, are made upright/readable with PIL first (img2dataset ignores EXIF
orientation).

Like img2dataset, fetches run on a pool of threads and decode/resize runs on the calling thread,
with at most two fetched bodies per thread waiting; the Resizer redirects the process's
stdout/stderr while it decodes, which is only safe from one thread. Which row a thread fetches next
is ``stages.scheduler``'s call, on ``stages.politeness``'s state: per-domain concurrency and rate
limits, 429/503 back-off, a circuit breaker per domain and (optionally) robots.txt. That state,
and the DNS cache (``stages.resolver``), live on the stage
instance, which is an actor (``stateful``) so they last across a worker's shards; the limits are
therefore per worker, and ingest's ``spread_domains`` is what keeps one domain off one worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator

from pairsift.stages.base import IMAGE, REASON, Contract, Resources, Stage, StageConfig, with_reason
from pairsift.stages.fetch import (
    BAD_URL,
    DEFAULT_USER_AGENT,
    DNS_ERROR,
    FAILED,
    OPT_OUT,
    REFUSED,
    TIMEOUT,
    TOO_LARGE,
    FetchPolicy,
    FetchResult,
    fetch,
)
from pairsift.stages.image_inspect import (
    DECODE_ERROR,
    IMAGE_TOO_LARGE,
    NOT_AN_IMAGE,
    PIL_PIXEL_LIMIT,
    Rejected,
    inspect_image,
)
from pairsift.stages.politeness import (
    DOMAIN_UNAVAILABLE,
    RATE_LIMITED,
    ROBOTS_DISALLOWED,
    ROBOTS_MAX_BYTES,
    BackoffConfig,
    BreakerConfig,
    DomainLimits,
    Politeness,
)
from pairsift.stages.resolver import CachingResolver, Resolver, system_resolver
from pairsift.stages.scheduler import RowScheduler, Ticket

DECODE_REASONS = frozenset({DECODE_ERROR, NOT_AN_IMAGE, IMAGE_TOO_LARGE})
# img2dataset's status vocabulary (its downloader.py); FAILED (fetch.py) is "failed_to_download".
SUCCESS = "success"
FAILED_TO_RESIZE = "failed_to_resize"
MAX_STATUS_KINDS = 1000  # img2dataset caps its status_dict too (CappedCounter)


class DownloadConfig(StageConfig):
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "border"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)  # for png: the zlib compression level, 0-9
    retries: int = Field(0, ge=0)
    timeout_s: float = Field(10.0, gt=0)  # one socket operation
    deadline_s: float = Field(30.0, gt=0)  # the whole request, redirects included
    max_bytes: int = Field(20_000_000, gt=0)
    max_pixels: int = Field(50_000_000, gt=0, le=PIL_PIXEL_LIMIT)
    thread_count: int = Field(32, ge=1, le=1024)
    user_agent_token: str | None = Field(None, pattern=r"^[A-Za-z0-9._+-]+$")
    respect_opt_out: bool = True
    allow_loopback: bool = False  # loopback servers (tests, `pairsift serve`); never other private ranges
    max_redirects: int = Field(5, ge=0)
    compute_sha256: bool = True
    # Politeness, per worker (see stages/politeness.py). Limits are off unless set: a real-web preset
    # sets e.g. per_domain: {max_concurrency: 4, requests_per_s: 10}.
    per_domain: DomainLimits = DomainLimits()
    domain_overrides: dict[str, DomainLimits] = {}  # "example.com" also covers its subdomains
    backoff: BackoffConfig = BackoffConfig()  # HTTP 429/503
    breaker: BreakerConfig = BreakerConfig()
    respect_robots_txt: bool = False
    # Every attempt and pause of one row, from its first request; default deadline_s * (1 + retries).
    row_deadline_s: float | None = Field(None, gt=0)
    dns_ttl_s: float = Field(300.0, ge=0)

    @field_validator("domain_overrides")
    @classmethod
    def _resolve_overrides(cls, overrides: dict[str, DomainLimits], info: ValidationInfo) -> dict[str, DomainLimits]:
        """Lower-case the names and fill each override's unset limits from ``per_domain`` now, so
        the config means the same after a model_dump() round trip to a worker."""
        base = info.data.get("per_domain")
        resolved: dict[str, DomainLimits] = {}
        for domain, limits in overrides.items():
            name = domain.strip().strip(".").lower()
            if not name or any(c in name for c in "/:@ ?#"):
                raise ValueError(f"domain_overrides: {domain!r} is not a host name (write e.g. 'example.com')")
            resolved[name] = base.merged(limits) if base is not None else limits
        return resolved

    @model_validator(mode="after")
    def _png_quality_is_a_compression_level(self) -> DownloadConfig:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError(
                f"download: encode_quality for png is a compression level 0-9, got {self.encode_quality}"
            )
        return self

    def fetch_policy(self) -> FetchPolicy:
        agent = DEFAULT_USER_AGENT
        if self.user_agent_token:
            agent += f" (compatible; {self.user_agent_token})"
        return FetchPolicy(
            timeout_s=self.timeout_s,
            deadline_s=self.deadline_s,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            retries=self.retries,
            allow_loopback=self.allow_loopback,
            respect_opt_out=self.respect_opt_out,
            user_agent=agent,
            user_agent_token=self.user_agent_token,
        )

    @property
    def row_deadline(self) -> float:
        return self.row_deadline_s or self.deadline_s * (1 + self.retries)

    def politeness(self) -> Politeness:
        return Politeness(
            self.per_domain,
            self.domain_overrides,
            self.backoff,
            self.breaker,
            respect_robots_txt=self.respect_robots_txt,
            robots_agent=self.user_agent_token or "pairsift",
        )


@dataclass
class RowResult:
    reason: str | None = None
    error: str | None = None
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None

    @property
    def status(self) -> str:
        return img2dataset_status(self.reason)


def img2dataset_status(reason: str | None) -> str:
    """img2dataset's three statuses for one of our reasons: the bytes never arrived (every fetch,
    address, opt-out and politeness reason), or they arrived and did not decode to an image."""
    if reason is None:
        return SUCCESS
    return FAILED_TO_RESIZE if reason in DECODE_REASONS else FAILED


COLUMNS: dict[str, pa.DataType] = {
    "status": pa.string(),
    "error": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "sha256": pa.string(),
    IMAGE: pa.binary(),
}
# What --retry-failed may cure. Failures that say nothing about the image: the network, the
# resolver or the server was having a bad moment (HTTP 5xx and dropped connections are
# failed_to_download; 429/503 end rate_limited).
TRANSIENT = (TIMEOUT, DNS_ERROR, FAILED, DOMAIN_UNAVAILABLE, RATE_LIMITED)
# Retried only when asked: a server may have served an error page or a cut file, or changed robots.txt.
ON_REQUEST = (DECODE_ERROR, NOT_AN_IMAGE, ROBOTS_DISALLOWED)
NEVER = {
    OPT_OUT: "the site opted out of AI training",
    REFUSED: "the address policy refused it and would again",
    BAD_URL: "the url itself is malformed",
    TOO_LARGE: "the same download.max_bytes would refuse it again (raising it redoes the stage)",
    IMAGE_TOO_LARGE: "the same download.max_pixels would refuse it again (raising it redoes the stage)",
}


class Download(Stage):
    name: ClassVar[str] = "download"
    config_class: ClassVar[type[StageConfig]] = DownloadConfig
    # An actor: the DNS cache, per-domain limits, breakers and robots.txt outlive one shard.
    stateful: ClassVar[bool] = True
    # img2dataset's 11 keys, in its order, then our uid. KEY (the member name) is the uid, so ``key``
    # is too; pairsift extracts no EXIF, so ``exif`` is null (see README, img2dataset compatibility).
    sample_json: ClassVar[dict[str, str]] = {
        "url": "url", "caption": "caption", "key": "uid", "status": "status", "error_message": "error",
        "width": "width", "height": "height", "original_width": "original_width",
        "original_height": "original_height", "exif": "exif", "sha256": "sha256", "uid": "uid",
    }
    cfg: DownloadConfig

    def __init__(self, cfg: DownloadConfig, resolver: Resolver | None = None):
        """``resolver`` maps a host name to addresses; tests inject one, the default is the system's
        ``getaddrinfo``. Either way it sits behind a per-worker cache (``dns_ttl_s``)."""
        super().__init__(cfg)
        self._resolver: Resolver = CachingResolver(resolver or system_resolver, ttl_s=cfg.dns_ttl_s)
        self.politeness = cfg.politeness()
        self._resizer: Any = None

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1)  # the threads mostly wait on the network; decoding is one core

    def contract(self) -> Contract:
        # A resolver outage makes every URL look dead: rather than quietly marking most of the pool
        # as failed, the run stops once dns_error passes half of the rows.
        return Contract(reads=("url",), optional=("caption",), writes=dict(COLUMNS),
                        reasons=(*TRANSIENT, *ON_REQUEST, *NEVER), retryable=TRANSIENT,
                        retryable_on_request=ON_REQUEST, final=dict(NEVER), abort_shares={DNS_ERROR: 0.5})

    def setup(self) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations calls home on import
        from img2dataset.resizer import Resizer

        self._resizer = Resizer(
            image_size=self.cfg.image_size,
            resize_mode=self.cfg.resize_mode,
            resize_only_if_bigger=self.cfg.resize_only_if_bigger,
            encode_format=self.cfg.encode_format,
            encode_quality=self.cfg.encode_quality,
        )

    def __call__(self, shard: pa.Table) -> pa.Table:
        if self._resizer is None:
            self.setup()
        if "url" not in shard.column_names:
            raise ValueError(
                f"download: the shard has no 'url' column (columns: {', '.join(shard.column_names)})"
            )
        rows = self.download_all(shard.column("url").to_pylist())
        for name, kind in COLUMNS.items():
            values = [r.status if name == "status" else getattr(r, name) for r in rows]
            shard = _put_column(shard, name, pa.array(values, kind))
        return with_reason(shard, [r.reason for r in rows])

    def tar_stats(self, output: pa.Table, started_at: float, ended_at: float) -> dict[str, Any]:
        """img2dataset's ``NNNNN_stats.json`` (its logger.py ``write_stats``), plus our finer
        ``reasons``. DataComp's resharder reads ``successes`` as the shard's sample count."""
        statuses = Counter(output.column("status").to_pylist())
        errors = Counter(_first_line(e) for e in output.column("error").to_pylist() if e)
        return {
            "count": output.num_rows,
            "successes": statuses[SUCCESS],
            "failed_to_download": statuses[FAILED],
            "failed_to_resize": statuses[FAILED_TO_RESIZE],
            "duration": ended_at - started_at,
            "start_time": started_at,
            "end_time": ended_at,
            # like img2dataset's: "success" and each error message, counted
            "status_dict": dict((Counter({SUCCESS: statuses[SUCCESS]}) + errors).most_common(MAX_STATUS_KINDS)),
            "reasons": dict(Counter(r for r in output.column(REASON).to_pylist() if r is not None)),
        }

    def download_all(self, urls: list[Any]) -> list[RowResult]:
        """One RowResult per url, in order. ``thread_count`` threads fetch what the per-domain
        scheduler hands them; at most two fetched bodies per thread wait for the (single-threaded)
        decode here, which bounds memory."""
        if not urls:
            return []
        results: list[RowResult | None] = [None] * len(urls)
        done: queue.SimpleQueue[tuple[int, FetchResult]] = queue.SimpleQueue()
        digests: dict[int, str] = {}  # hashed on the fetch threads (hashlib releases the GIL)
        bodies = threading.Semaphore(2 * self.cfg.thread_count)
        scheduler = RowScheduler(
            self.politeness,
            urls,
            lambda index, fetched: done.put((index, fetched)),
            self.cfg.row_deadline,
            self.cfg.retries,
        )
        workers = [
            threading.Thread(target=self._fetch_loop, args=(scheduler, bodies, digests), daemon=True)
            for _ in range(min(self.cfg.thread_count, len(urls)))
        ]
        for worker in workers:
            worker.start()
        try:
            for _ in range(len(urls)):
                index, fetched = self._next_result(done, workers)
                try:
                    results[index] = self.finish(fetched, digests.pop(index, None))
                except Exception as exc:  # noqa: BLE001 - per-row failures are values
                    results[index] = RowResult(DECODE_ERROR, f"{type(exc).__name__}: {exc}")
                finally:
                    if fetched.data is not None:
                        bodies.release()
        finally:
            scheduler.close()
            for _ in workers:  # should this loop have stopped early, no thread waits for a slot
                bodies.release()
            for worker in workers:
                worker.join()  # each is at most one request (bounded by its deadline) from done
        return [r if r is not None else RowResult(FAILED, "lost result") for r in results]

    @staticmethod
    def _next_result(done: queue.SimpleQueue, workers: list[threading.Thread]) -> tuple[int, FetchResult]:
        while True:
            try:
                return done.get(timeout=1.0)
            except queue.Empty:
                if any(worker.is_alive() for worker in workers):
                    continue
                try:  # the last rows may have come in between the timeout and the check
                    return done.get_nowait()
                except queue.Empty:
                    raise RuntimeError("download: every fetch thread ended with rows left") from None

    def _fetch_loop(self, scheduler: RowScheduler, bodies: threading.Semaphore, digests: dict[int, str]) -> None:
        policy = dataclasses.replace(self.cfg.fetch_policy(), retries=0)  # the scheduler retries
        while True:
            bodies.acquire()  # a body this thread fetches has a place to wait for the decode
            ticket = scheduler.take()
            if ticket is None:
                bodies.release()
                return
            fetched = self._fetch_ticket(ticket, policy)
            body = fetched.data is not None and not ticket.robots
            if body and self.cfg.compute_sha256:
                digests[ticket.index] = hashlib.sha256(fetched.data).hexdigest()
            ended = scheduler.finish(ticket, fetched)
            if not (ended and body):
                bodies.release()  # otherwise the decode loop releases it once the body is used

    def _fetch_ticket(self, ticket: Ticket, policy: FetchPolicy) -> FetchResult:
        remaining = ticket.deadline - self.politeness.clock()
        if remaining <= 0:
            return FetchResult(ticket.url, reason=TIMEOUT, error="row deadline passed", retryable=True)
        policy = dataclasses.replace(policy, deadline_s=min(policy.deadline_s, remaining))
        if ticket.robots:  # rules, not content: no opt-out check, RFC 9309's 500 KiB
            policy = dataclasses.replace(policy, max_bytes=ROBOTS_MAX_BYTES, respect_opt_out=False)
        try:
            return fetch(ticket.url, policy, self._resolver)
        except Exception as exc:  # noqa: BLE001 - a bug for one url must not cost the shard
            return FetchResult(ticket.url, reason=FAILED, error=f"{type(exc).__name__}: {exc}")

    def finish(self, fetched: FetchResult, digest: str | None) -> RowResult:
        """Turn fetched bytes into the stored image, or the reason there is none."""
        if not fetched.ok or fetched.data is None:
            return RowResult(fetched.reason or FAILED, fetched.error)
        try:
            prepared = inspect_image(fetched.data, self.cfg.max_pixels)
        except Rejected as rejected:
            return RowResult(rejected.reason, str(rejected), sha256=digest)
        image, width, height, original_width, original_height, error = self._resizer(io.BytesIO(prepared))
        if error is not None:
            return RowResult(DECODE_ERROR, error, sha256=digest)
        return RowResult(None, None, image, width, height, original_width, original_height, digest)


def _first_line(error: str) -> str:
    return error.splitlines()[0][:200] if error.strip() else error


def _put_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:  # a re-run on its own output replaces, never duplicates
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
