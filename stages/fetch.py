"""Fetch one URL safely: the only code in pairsift that opens a connection to the web.

A URL list is untrusted input and so is every server on it. Before any connection the host is
resolved (an injectable resolver, so tests never touch real DNS) and each address is checked
(``stages.addresses``: IANA's special-purpose registries as an explicit table): only globally
routable unicast addresses are dialled (loopback only with ``allow_loopback``), numeric
host spellings (``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``[::ffff:10.0.0.1]``) are normalised
first, and the socket connects to the exact address that was checked, so a DNS answer that changes
between check and use (rebinding) cannot move it. Redirects are followed by hand and every hop is
checked the same way. A whole-request deadline is enforced on every socket read (a server dripping
one byte per second cannot hold a thread past it), the body is streamed under a byte cap, and
``X-Robots-Tag``/``tdm-reservation`` opt-outs are honoured when the headers arrive, before the body.
Failures are values: a ``FetchResult`` with a ``reason`` from the catalog's vocabulary; an HTTP
error keeps its status and headers (``Retry-After``) for the caller's per-domain back-off
(``stages.politeness``).
Standard library only (``http.client``): no proxies from the environment can bypass the checks.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urljoin, urlsplit

from pairsift.stages.addresses import IPAddress, address_refusal, numeric_host
from pairsift.stages.resolver import Resolver, system_resolver

# Reasons (the catalog's vocabulary for why a row was dropped).
FAILED = "failed_to_download"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
REFUSED = "refused_address"
OPT_OUT = "opt_out"
DNS_ERROR = "dns_error"
BAD_URL = "bad_url"

# X-Robots-Tag directives that opt an image out of AI/ML training. "noindex" is about search
# engines, not training, so it is deliberately not here.
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noml", "none"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_USER_AGENT = "Mozilla/5.0 (compatible; pairsift/0.1; +https://github.com/pairsift/pairsift)"
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0  # the longest one socket operation may wait
    deadline_s: float = 30.0  # the whole request, redirects included
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    retries: int = 0
    allow_loopback: bool = False
    respect_opt_out: bool = True
    user_agent: str = DEFAULT_USER_AGENT
    user_agent_token: str | None = None  # a scoped "X-Robots-Tag: <token>: noai" applies to us
    # Verifying TLS context (e.g. a private CA bundle); None = the system's trust store.
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass
class FetchResult:
    url: str  # the final URL, after redirects
    data: bytes | None = None
    reason: str | None = None
    error: str | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retryable: bool = False  # a transient failure worth another attempt

    @property
    def ok(self) -> bool:
        return self.reason is None


class FetchRefused(Exception):
    """A request stopped for a reason in the catalog vocabulary."""

    def __init__(self, reason: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Target:
    """A checked request target: where to connect (``ips``) and what to say (``host``, ``path``)."""

    scheme: str
    host: str  # the name for Host/SNI (an IP literal in canonical form for numeric hosts)
    port: int
    path: str
    ips: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Parsing and the address policy (resolution and its cache: stages/resolver.py)


def parse_url(url: object) -> tuple[str, str, int, str, IPAddress | None]:
    """Split a URL into (scheme, host, port, request path, numeric address or None).

    Raises FetchRefused(bad_url) for anything that is not a well-formed http(s) URL."""
    if not isinstance(url, str) or not url.strip():
        raise FetchRefused(BAD_URL, "empty url")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchRefused(BAD_URL, f"malformed url: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(BAD_URL, f"scheme {scheme or '(none)'!r} is not http or https")
    host = unquote(parts.hostname or "")  # hostname is lower-cased, brackets stripped
    if not host:
        raise FetchRefused(BAD_URL, "url has no host")
    try:
        ip = numeric_host(host)
        if ip is None:
            host = host.rstrip(".").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise FetchRefused(BAD_URL, f"invalid host {host!r}: {exc}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in path):
        path = _quote_path(path)
    return scheme, host, port or (443 if scheme == "https" else 80), path, ip


def _quote_path(path: str) -> str:
    # http.client refuses control characters and non-ASCII in the request line; browsers send them
    # percent-encoded, so do the same (existing %XX escapes are kept).
    return quote(path, safe="/?&=%:;@!$'()*+,~#[]-._")


def resolve_target(url: str, resolver: Resolver, allow_loopback: bool = False) -> Target:
    """Parse, resolve and check ``url``. Every address must pass: one bad answer refuses the host,
    so a name cannot mix a public address with an internal one."""
    scheme, host, port, path, ip = parse_url(url)
    if ip is not None:
        addresses: list[IPAddress] = [ip]
        host = str(ip).split("%")[0]
    else:
        try:
            answers = resolver(host)
        except (OSError, UnicodeError) as exc:
            raise FetchRefused(DNS_ERROR, f"cannot resolve {host!r}: {exc}", retryable=True) from None
        if not answers:
            raise FetchRefused(DNS_ERROR, f"no address for {host!r}", retryable=True)
        try:
            addresses = [ipaddress.ip_address(a) for a in answers]
        except ValueError as exc:
            raise FetchRefused(DNS_ERROR, f"resolver returned a bad address for {host!r}: {exc}") from None
    for address in addresses:
        why = address_refusal(address, allow_loopback)
        if why:
            raise FetchRefused(REFUSED, f"refused {address} for host {host!r}: {why}")
    return Target(scheme, host, port, path, tuple(str(a) for a in addresses))


# ---------------------------------------------------------------------------------------------
# Connections that dial the checked address and enforce the deadline on every read


class _Clock:
    def __init__(self, timeout_s: float, deadline_s: float):
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s

    def next_timeout(self) -> float:
        """The timeout for the next socket operation; raises when the whole request is out of time."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise FetchRefused(TIMEOUT, f"deadline of {self.deadline_s:g}s exceeded", retryable=True)
        return min(self.timeout_s, remaining)


class _DeadlineRaw(io.RawIOBase):
    """The raw stream http.client reads from: re-arms the socket timeout before every recv, so
    header lines, chunk sizes and body bytes are all bound by the request's deadline."""

    def __init__(self, sock: socket.socket, clock: _Clock):
        self._sock = sock
        self._clock = clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        self._sock.settimeout(self._clock.next_timeout())
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """Stands in for the connected socket inside http.client (sendall, makefile, close)."""

    def __init__(self, sock: socket.socket, clock: _Clock):
        self._sock = sock
        self._clock = clock

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._clock.next_timeout())
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineRaw(self._sock, self._clock), _READ_CHUNK)

    def close(self) -> None:
        # http.client closes the connection as soon as a "Connection: close" response begins,
        # while the body is still to be read; the real socket is closed by ``_request`` instead.
        pass

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process: loading the CA store per request costs milliseconds."""
    return ssl.create_default_context()


def _open_connection(
    target: Target, clock: _Clock, tls_context: ssl.SSLContext | None = None
) -> http.client.HTTPConnection:
    """A connection whose socket goes to ``target.ips`` (already checked), never to a fresh lookup
    of the name; TLS still verifies and sends SNI for the name."""
    if target.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port, timeout=clock.next_timeout(), context=tls_context or _tls_context()
        )
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=clock.next_timeout())

    def dial_checked(address, timeout, source_address=None):
        last: OSError | None = None
        for ip in target.ips:
            try:
                sock = socket.create_connection((ip, address[1]), clock.next_timeout(), source_address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                last = exc
        raise last or OSError("no address to connect to")

    conn._create_connection = dial_checked  # type: ignore[attr-defined]
    try:
        conn.connect()  # TCP, then TLS (handshake bounded by the socket timeout set above)
    except BaseException:
        conn.close()  # a failed TLS handshake leaves the plain socket open
        raise
    return conn


# ---------------------------------------------------------------------------------------------
# Headers


def is_opted_out(headers: http.client.HTTPMessage, user_agent_token: str | None) -> str | None:
    """The opt-out a response declares, or None. ``X-Robots-Tag: noai`` applies to everyone,
    ``X-Robots-Tag: somebot: noai`` only to that bot; ``tdm-reservation: 1`` (W3C TDMRep) too."""
    token = user_agent_token.strip().lower() if user_agent_token else None
    for value in headers.get_all("X-Robots-Tag") or []:
        scope, _, rest = value.partition(":")
        if rest and re.fullmatch(r"[\w.-]+", scope.strip()):  # "<bot>: directives", scoped to that bot
            if scope.strip().lower() != token:
                continue
            value = rest
        directives = {d.strip().lower() for d in value.split(",")}
        hit = sorted(directives & OPT_OUT_DIRECTIVES)
        if hit:
            return f"X-Robots-Tag: {', '.join(hit)}"
    for value in headers.get_all("tdm-reservation") or []:
        if value.strip() == "1":
            return "tdm-reservation: 1"
    return None


def _flat_headers(headers: http.client.HTTPMessage) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in headers.items():
        key = key.lower()
        flat[key] = f"{flat[key]}, {value}" if key in flat else value
    return flat


# ---------------------------------------------------------------------------------------------
# One request


def fetch(url: str, policy: FetchPolicy = FetchPolicy(), resolver: Resolver | None = None) -> FetchResult:
    """Fetch ``url`` under ``policy``, retrying transient failures ``policy.retries`` times."""
    result = _fetch_once(url, policy, resolver or system_resolver)
    for _ in range(policy.retries):
        if result.ok or not result.retryable:
            break
        result = _fetch_once(url, policy, resolver or system_resolver)
    return result


def _fetch_once(url: str, policy: FetchPolicy, resolver: Resolver) -> FetchResult:
    clock = _Clock(policy.timeout_s, policy.deadline_s)
    current = url
    try:
        seen: set[str] = set()
        for _ in range(policy.max_redirects + 1):
            seen.add(current)
            target = resolve_target(current, resolver, policy.allow_loopback)
            location = _request(target, policy, clock, current)
            if isinstance(location, FetchResult):
                return location
            current = urljoin(current, location)
            if current in seen:
                raise FetchRefused(FAILED, f"redirect loop at {current}")
        raise FetchRefused(FAILED, f"more than {policy.max_redirects} redirects")
    except FetchRefused as exc:
        return FetchResult(current, reason=exc.reason, error=str(exc), retryable=exc.retryable)
    except TimeoutError:
        if time.monotonic() >= clock.deadline - 0.01:
            message = f"deadline of {policy.deadline_s:g}s exceeded"
        else:
            message = f"no data for {policy.timeout_s:g}s"
        return FetchResult(current, reason=TIMEOUT, error=message, retryable=True)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # Connection refused/reset, TLS failures, malformed responses, a short body.
        return FetchResult(current, reason=FAILED, error=f"{type(exc).__name__}: {exc}", retryable=True)


def _request(target: Target, policy: FetchPolicy, clock: _Clock, url: str) -> FetchResult | str:
    """One hop: a FetchResult when it ends here, or the Location to follow."""
    conn = _open_connection(target, clock, policy.tls_context)
    raw_socket = conn.sock
    conn.sock = _DeadlineSocket(raw_socket, clock)
    try:
        conn.putrequest("GET", target.path)  # also sends "Accept-Encoding: identity"
        conn.putheader("User-Agent", policy.user_agent)
        conn.putheader("Accept", "image/*,*/*;q=0.8")
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = _get_response(conn)
        headers = _flat_headers(response.headers)
        if response.status in REDIRECT_STATUSES:
            location = response.headers.get("Location")
            if not location:
                raise FetchRefused(FAILED, f"HTTP {response.status} without Location")
            return location.strip()
        if not 200 <= response.status < 300:
            # A value, not an exception: the status and headers (Retry-After) drive the caller's
            # per-domain back-off. The body of an error page is never read.
            return FetchResult(
                url,
                reason=FAILED,
                error=f"HTTP {response.status} {response.reason}",
                status=response.status,
                headers=headers,
                retryable=response.status >= 500 or response.status == 429,
            )
        if policy.respect_opt_out:
            opt_out = is_opted_out(response.headers, policy.user_agent_token)
            if opt_out:
                return FetchResult(
                    url,
                    reason=OPT_OUT,
                    error=f"opted out by {opt_out}",
                    status=response.status,
                    headers=headers,
                )
        data = _read_capped(response, policy.max_bytes)
        return FetchResult(url, data=data, status=response.status, headers=headers)
    finally:
        conn.close()
        raw_socket.close()


def _get_response(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
    """The response, its headers read under http.client's own limits (64 KiB per line, 100 lines),
    which stop a 1 MB header or thousands of header lines after reading at most ~6.5 MB. Past a
    limit the server is broken or hostile and would answer the same again: not retryable."""
    try:
        return conn.getresponse()
    except http.client.LineTooLong as exc:  # the status line or one header line
        raise FetchRefused(FAILED, f"response headers too large: {exc}") from None
    except http.client.HTTPException as exc:
        if type(exc) is not http.client.HTTPException:
            raise  # BadStatusLine, RemoteDisconnected ...: handled (and retried) by the caller
        # The bare class is only raised for too many header lines ("got more than 100 headers").
        raise FetchRefused(FAILED, f"response headers too large: {exc}") from None


def _read_capped(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """Stream the body, stopping as soon as it passes ``max_bytes``; a declared length above the
    cap is refused before a byte of body is read."""
    if response.length is not None and response.length > max_bytes:
        raise FetchRefused(TOO_LARGE, f"Content-Length {response.length} is above the cap of {max_bytes}")
    body = bytearray()
    while True:
        chunk = response.read1(min(_READ_CHUNK, max_bytes + 1 - len(body)))
        if not chunk:
            break
        body += chunk
        if len(body) > max_bytes:
            raise FetchRefused(TOO_LARGE, f"body passed the cap of {max_bytes} bytes")
    if response.length:  # read1 does not complain about a body shorter than its Content-Length
        raise http.client.IncompleteRead(bytes(body), response.length)
    return bytes(body)
