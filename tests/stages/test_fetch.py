"""stages/fetch.py: the address policy, deadlines, caps and opt-outs, against a real hostile server.

Only 127.0.0.1 is ever dialled. Tests of refused addresses install a connection recorder that
refuses (and records) any other destination, then assert that nothing but 127.0.0.1 was tried.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import time
import tracemalloc
import zlib
from urllib.parse import quote

import pytest
from hostile_server import ENCODING_BOMB_SIZE, HostileServer, encoding_bomb

from pairsift.stages.addresses import SPECIAL_PURPOSE, address_refusal, parse_ipv4_number
from pairsift.stages.fetch import (
    BAD_URL,
    DNS_ERROR,
    FAILED,
    OPT_OUT,
    REFUSED,
    TIMEOUT,
    TOO_LARGE,
    FetchPolicy,
    fetch,
    is_opted_out,
    resolve_target,
)
from pairsift.stages.resolver import CachingResolver

FAKE_DNS = {
    "internal.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "six.test": ["::1"],
    "ula.test": ["fd00::5"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "mixed.test": ["93.184.216.34", "10.0.0.1"],  # one bad answer refuses the host
    "public.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
    "localhost.test": ["127.0.0.1"],
    "images.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1"],
    "xn--bcher-kva.test": ["93.184.216.34"],
    "empty.test": [],
}


def fake_resolver(host: str) -> list[str]:
    """DNS for made-up names; anything else fails, so no test ever reaches real DNS."""
    if host not in FAKE_DNS:
        raise socket.gaierror(socket.EAI_NONAME, f"fake DNS has no {host}")
    return list(FAKE_DNS[host])


@pytest.fixture
def dialled(monkeypatch) -> list[str]:
    """Record every address a socket tries to connect to; refuse (never dial) any but 127.0.0.1."""
    seen: list[str] = []
    real_create, real_connect = socket.create_connection, socket.socket.connect

    def create_connection(address, *args, **kwargs):
        seen.append(str(address[0]))
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test guard: refused to dial {address[0]}")
        return real_create(address, *args, **kwargs)

    def connect(self, address):
        seen.append(str(address[0]) if isinstance(address, tuple) else str(address))
        if isinstance(address, tuple) and address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test guard: refused to dial {address[0]}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


@pytest.fixture(scope="module")
def server():
    with HostileServer(drip_interval_s=0.5) as running:
        yield running


LOOPBACK_OK = FetchPolicy(allow_loopback=True, deadline_s=1.0, timeout_s=5.0, max_bytes=1_000_000)


# --- numeric host forms and the address table ------------------------------------------------


@pytest.mark.parametrize(
    "host, expected",
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7F.0.0.0x1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("10.0.0.1.", "10.0.0.1"),
        ("2852039166", "169.254.169.254"),
        ("0", "0.0.0.0"),
        ("example.com", None),
        ("1.example", None),
    ],
)
def test_ipv4_numeric_spellings_are_normalised(host, expected):
    parsed = parse_ipv4_number(host)
    assert (str(parsed) if parsed is not None else None) == expected


@pytest.mark.parametrize(
    "host", ["1.2.3.4.5", "256.0.0.1", "08.0.0.1", "0x1g.0.0.1", "1.2.16777216", "4294967296"]
)
def test_invalid_numeric_hosts_are_errors_not_names(host):
    with pytest.raises(ValueError):
        parse_ipv4_number(host)


@pytest.mark.parametrize(
    "url, reason, why",
    [
        ("http://127.0.0.1/", REFUSED, "loopback"),
        ("http://2130706433/", REFUSED, "loopback"),
        ("http://0177.0.0.1/", REFUSED, "loopback"),
        ("http://0x7f.1/", REFUSED, "loopback"),
        ("http://[::1]/", REFUSED, "loopback"),
        ("http://[::ffff:127.0.0.1]/", REFUSED, "loopback"),
        ("http://10.0.0.1/", REFUSED, "private"),
        ("http://172.16.5.4/", REFUSED, "private"),
        ("http://192.168.1.1/", REFUSED, "private"),
        ("http://[::ffff:10.0.0.1]/", REFUSED, "private"),
        ("http://[64:ff9b::a00:1]/", REFUSED, "private"),  # NAT64 to 10.0.0.1
        ("http://[64:ff9b::7f00:1]/", REFUSED, "loopback"),  # NAT64 to 127.0.0.1
        ("http://[2002:a00:1::1]/", REFUSED, "private"),  # 6to4 from 10.0.0.1
        ("http://169.254.169.254/latest/meta-data/", REFUSED, "link-local"),
        ("http://2852039166/", REFUSED, "link-local"),
        ("http://[fe80::1]/", REFUSED, "link-local"),
        ("http://[fe80::1%25eth0]/", REFUSED, "link-local"),
        ("http://[fc00::1]/", REFUSED, "private"),
        ("http://[fd12:3456::1]/", REFUSED, "private"),
        ("http://224.0.0.1/", REFUSED, "multicast"),
        ("http://[ff02::1]/", REFUSED, "multicast"),
        ("http://240.0.0.1/", REFUSED, "reserved"),
        ("http://0.0.0.0/", REFUSED, "unspecified"),
        ("http://0/", REFUSED, "unspecified"),
        ("http://[::]/", REFUSED, "unspecified"),
        ("http://100.64.0.1/", REFUSED, "not globally routable"),
        ("http://internal.test/a.jpg", REFUSED, "private"),
        ("http://metadata.test/latest", REFUSED, "link-local"),
        ("http://six.test/", REFUSED, "loopback"),
        ("http://ula.test/", REFUSED, "private"),
        ("http://mapped.test/", REFUSED, "private"),
        ("http://mixed.test/", REFUSED, "private"),
        ("http://localhost.test/", REFUSED, "loopback"),
        ("http://nowhere.test/", DNS_ERROR, "cannot resolve"),
        ("http://empty.test/", DNS_ERROR, "no address"),
        ("ftp://93.184.216.34/a.jpg", BAD_URL, "scheme"),
        ("file:///etc/passwd", BAD_URL, "scheme"),
        ("javascript:alert(1)", BAD_URL, "scheme"),
        ("data:image/png;base64,AAAA", BAD_URL, "scheme"),
        ("//93.184.216.34/a.jpg", BAD_URL, "scheme"),
        ("http://", BAD_URL, "no host"),
        ("http://93.184.216.34:99999/", BAD_URL, "malformed"),
        ("http://1.2.3.4.5/", BAD_URL, "invalid host"),
        ("http://256.1.1.1/", BAD_URL, "invalid host"),
        ("http://[::1/", BAD_URL, "malformed"),
        ("", BAD_URL, "empty"),
    ],
)
def test_address_policy_refuses_without_connecting(url, reason, why, dialled):
    result = fetch(url, FetchPolicy(deadline_s=2.0), resolver=fake_resolver)
    assert result.reason == reason, result.error
    assert why in result.error
    assert dialled == []  # refused before any socket was opened


@pytest.mark.parametrize(
    "url, ips",
    [
        ("http://public.test/a.jpg", ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946")),
        ("https://93.184.216.34/a.jpg", ("93.184.216.34",)),
        ("http://1572395042/", ("93.184.216.34",)),  # decimal spelling of the same address
        ("http://b\u00fccher.test/x", ("93.184.216.34",)),  # IDNA: the resolver sees xn--bcher-kva.test
        ("http://[2606:4700:4700::1111]:8080/", ("2606:4700:4700::1111",)),
    ],
)
def test_global_addresses_pass_the_policy(url, ips):
    # Checked with resolve_target only: the policy must accept these, but tests never dial them.
    target = resolve_target(url, fake_resolver)
    assert target.ips == ips


@pytest.mark.parametrize(
    "address, refused_without_flag, refused_with_flag",
    [
        ("127.0.0.1", True, False),
        ("127.8.9.10", True, False),
        ("::1", True, False),
        ("::ffff:127.0.0.1", True, False),
        ("64:ff9b::7f00:1", True, True),  # NAT64 around 127.0.0.1 leaves the host
        ("2002:7f00:1::1", True, True),  # so does 6to4
        ("0.0.0.0", True, True),
        ("10.0.0.1", True, True),
        ("169.254.169.254", True, True),
        ("8.8.8.8", False, False),
        ("2606:4700:4700::1111", False, False),
        ("::ffff:8.8.8.8", False, False),  # IPv4-mapped: judged as the IPv4 address
        ("2002:5db8:d822::1", False, False),  # 6to4 around 93.184.216.34
        ("64:ff9b::5db8:d822", False, False),  # NAT64 to 93.184.216.34
        ("2001:0:4136:e378:8000:63bf:a247:27dd", True, True),  # Teredo: the tunnel prefix is not global
    ],
)
def test_allow_loopback_opens_loopback_only(address, refused_without_flag, refused_with_flag):
    ip = ipaddress.ip_address(address)
    assert (address_refusal(ip, allow_loopback=False) is not None) == refused_without_flag
    assert (address_refusal(ip, allow_loopback=True) is not None) == refused_with_flag


@pytest.mark.parametrize(
    "host, why",
    [
        ("192.0.0.1", "IETF protocol assignments"),  # Python 3.11.7's is_global says True (CVE-2024-4032)
        ("192.0.0.9", "IETF protocol assignments"),  # an anycast service, not an image host
        ("192.0.0.170", "IETF protocol assignments"),  # NAT64/DNS64 discovery
        ("0.1.2.3", "this network"),
        ("192.0.2.10", "TEST-NET-1"),
        ("198.51.100.7", "TEST-NET-2"),
        ("203.0.113.7", "TEST-NET-3"),
        ("198.19.255.1", "benchmarking"),
        ("192.88.99.1", "6to4 relay"),
        ("192.31.196.1", "AS112"),
        ("192.52.193.1", "AMT"),
        ("255.255.255.255", "limited broadcast"),
        ("[64:ff9b:1::a00:1]", "local-use IPv4/IPv6 translation"),  # /96 layout around 10.0.0.1
        ("[64:ff9b:1:5db8:d800:22::]", "local-use IPv4/IPv6 translation"),  # /48 layout around 93.184.216.34
        ("[64:ff9b:1:ffff::1]", "local-use IPv4/IPv6 translation"),
        ("[fec0::1]", "site-local"),
        ("[feff:ffff::1]", "site-local"),
        ("[100::1]", "discard-only"),
        ("[100:0:0:1::1]", "dummy IPv6 prefix"),
        ("[2001:2::1]", "IETF protocol assignments"),  # benchmarking, inside 2001::/23
        ("[2001:db8::1]", "documentation"),
        ("[3fff::1]", "documentation"),
        ("[5f00::1]", "SRv6"),
        ("[::8.8.8.8]", "outside the global unicast block"),  # deprecated IPv4-compatible form
        ("[::ffff:0:808:808]", "outside the global unicast block"),  # IPv4-translated (SIIT)
        ("[4000::1]", "outside the global unicast block"),
        ("[::ffff:192.0.0.1]", "IETF protocol assignments"),  # judged as the IPv4 address it maps
        ("[64:ff9b::c000:1]", "IETF protocol assignments"),  # well-known NAT64 to 192.0.0.1
    ],
)
def test_special_purpose_registries_are_refused_without_connecting(host, why, dialled):
    result = fetch(f"http://{host}/a.jpg", FetchPolicy(deadline_s=2.0), resolver=fake_resolver)
    assert result.reason == REFUSED, result.error
    assert why in result.error
    assert dialled == []


def test_every_registry_range_is_refused_at_its_first_and_last_address():
    for network, _, _ in SPECIAL_PURPOSE:
        for ip in (network[0], network[-1]):
            assert address_refusal(ip) is not None, ip
            assert address_refusal(ip, allow_loopback=True) is not None or ip.is_loopback, ip


def test_global_neighbours_of_the_special_ranges_still_pass():
    # The table must not refuse by accident what sits just outside its ranges.
    for address in ("192.0.1.1", "198.20.0.1", "100.128.0.1", "2001:200::1", "2001:db9::1", "3fff:1000::1",
                    "64:ff9b::5db8:d822"):
        assert address_refusal(ipaddress.ip_address(address)) is None, address


# --- redirects to forbidden places, DNS rebinding, TLS ----------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1/steal",
        "http://metadata.test/latest/meta-data/",  # resolves to 169.254.169.254
        "http://169.254.169.254/latest/meta-data/",
        "http://0x0a000001/",  # hex spelling of 10.0.0.1
        "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped 169.254.169.254
        "http://internal.test:8080/admin",
    ],
)
def test_redirect_to_internal_address_is_refused_before_connecting(server, dialled, target):
    url = server.url("/redirect-to?target=" + quote(target, safe=""))
    result = fetch(url, LOOPBACK_OK, resolver=fake_resolver)
    assert result.reason == REFUSED, result.error
    assert dialled == ["127.0.0.1"] * len(dialled) and len(dialled) >= 1  # only the first hop's server
    assert all(address == "127.0.0.1" for address in dialled)


def test_redirect_to_other_scheme_is_a_bad_url(server, dialled):
    result = fetch(server.url("/redirect-to?target=file%3A%2F%2F%2Fetc%2Fpasswd"), LOOPBACK_OK)
    assert result.reason == BAD_URL
    assert set(dialled) == {"127.0.0.1"}


def test_socket_dials_the_checked_address_not_a_second_lookup(server, dialled):
    """DNS rebinding: the first answer is checked, later answers would point inside. The connection
    must use the checked address, so the name is looked up exactly once."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])
    lookups: list[str] = []

    def rebinding_resolver(host: str) -> list[str]:
        lookups.append(host)
        return next(answers)

    result = fetch(f"http://rebind.test:{server.port}/ok.jpg", LOOPBACK_OK, resolver=rebinding_resolver)
    assert result.ok, result.error
    assert result.data == server.images["ok.jpg"]
    assert lookups == ["rebind.test"]
    assert set(dialled) == {"127.0.0.1"}
    assert server.request_headers[-1]["host"] == f"rebind.test:{server.port}"  # the name, not the IP


def test_each_redirect_hop_is_resolved_and_checked(server, dialled):
    # A redirect from a loopback URL to a name: the new host is resolved and checked before dialling.
    target = f"http://images.test:{server.port}/ok.jpg"
    result = fetch(
        server.url("/redirect-to?target=" + quote(target, safe="")), LOOPBACK_OK, resolver=fake_resolver
    )
    assert result.ok, result.error
    assert result.url == target
    assert set(dialled) == {"127.0.0.1"}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pairsift test CA",
    )
    run("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=images.test")
    (d / "ext.cnf").write_text("subjectAltName=DNS:images.test\n")
    run(
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return d


def test_https_dials_checked_ip_and_verifies_the_name(tls_files, dialled):
    context = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    policy = FetchPolicy(allow_loopback=True, deadline_s=3.0, tls_context=context)
    with HostileServer(tls=(str(tls_files / "srv.pem"), str(tls_files / "srv.key"))) as tls_server:
        good = fetch(f"https://images.test:{tls_server.port}/ok.jpg", policy, resolver=fake_resolver)
        assert good.ok, good.error
        assert good.data == tls_server.images["ok.jpg"]
        # Same IP, another name: the certificate is checked against the name, so this must fail.
        wrong = fetch(f"https://other.test:{tls_server.port}/ok.jpg", policy, resolver=fake_resolver)
        assert wrong.reason == FAILED and "certificate" in wrong.error.lower()
    assert set(dialled) == {"127.0.0.1"}


# --- hostile bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, reason, within_s",
    [
        ("/drip", TIMEOUT, 1.0 + 1.5),  # 1 byte / 0.5 s, each read well inside timeout_s=5
        ("/drip-headers", TIMEOUT, 1.0 + 1.5),  # the same, inside a header line
        ("/endless", TOO_LARGE, 1.5),
        ("/endless?chunked=1", TOO_LARGE, 1.5),
        ("/huge", TOO_LARGE, 0.5),  # Content-Length 1 TB: refused before reading
        ("/lie-long", FAILED, 1.5),
        ("/404", FAILED, 0.5),
        ("/redirect-loop", FAILED, 0.5),
        ("/redirect-chain/6", FAILED, 1.0),
        ("/noai", OPT_OUT, 0.5),
        ("/tdm", OPT_OUT, 0.5),
    ],
)
def test_hostile_endpoint_ends_with_its_reason_in_time(server, path, reason, within_s):
    started = time.monotonic()
    result = fetch(server.url(path), LOOPBACK_OK)
    elapsed = time.monotonic() - started
    assert result.reason == reason, result.error
    assert result.data is None
    assert elapsed < within_s


def test_deadline_cuts_a_drip_even_when_every_read_is_fast(server):
    # The drip's reads each take 0.5 s (< timeout_s), so only the whole-request deadline can stop it.
    policy = FetchPolicy(allow_loopback=True, deadline_s=1.2, timeout_s=30.0)
    started = time.monotonic()
    result = fetch(server.url("/drip"), policy)
    assert result.reason == TIMEOUT and "deadline" in result.error
    assert 1.0 < time.monotonic() - started < 1.2 + 1.0


def test_per_read_timeout_cuts_a_silent_server(server):
    policy = FetchPolicy(allow_loopback=True, deadline_s=30.0, timeout_s=0.3)
    started = time.monotonic()
    result = fetch(server.url("/drip"), policy)  # 0.5 s between bytes > 0.3 s read timeout
    assert result.reason == TIMEOUT and "no data" in result.error
    assert time.monotonic() - started < 1.5


def test_body_stops_at_the_byte_cap(server):
    cap = len(server.images["ok.jpg"]) - 1
    result = fetch(server.url("/ok.jpg"), FetchPolicy(allow_loopback=True, max_bytes=cap))
    assert result.reason == TOO_LARGE and "Content-Length" in result.error
    exact = fetch(server.url("/ok.jpg"), FetchPolicy(allow_loopback=True, max_bytes=cap + 1))
    assert exact.ok and len(exact.data) == cap + 1


def test_short_content_length_truncates_the_body(server):
    result = fetch(server.url("/lie-short"), LOOPBACK_OK)
    assert result.ok
    assert result.data == server.images["ok.jpg"][: len(server.images["ok.jpg"]) // 2]


@pytest.mark.parametrize("wrapper", ["gzip", "deflate"])
def test_encoding_bomb_helper_builds_a_valid_stream(wrapper):
    # The server's bombs are built like this at 2 GiB; at 40 MB they can be inflated in full here.
    size = 40_000_123
    stream = encoding_bomb(size, wrapper, block_size=1 << 20)
    inflated = zlib.decompress(stream, 31 if wrapper == "gzip" else 15)  # checks CRC-32 / Adler-32 too
    assert len(inflated) == size and inflated.count(0) == size
    assert len(stream) < size // 500


def measured_fetch(url: str, policy: FetchPolicy):
    """``fetch`` with its wall time and the peak Python memory it allocated (MB)."""
    tracemalloc.start()
    try:
        started = time.monotonic()
        result = fetch(url, policy)
        return result, time.monotonic() - started, tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "path, wrapper, content_type",
    [("/gzip-bomb", "gzip", "text/html"), ("/deflate-bomb", "deflate", "text/html"),
     ("/gzip-bomb.jpg", "gzip", "image/jpeg")],
)
def test_content_encoding_bomb_is_never_inflated(server, path, wrapper, content_type):
    """We ask for identity; a server that compresses anyway gets its few MB stored as sent, never
    the 2 GiB they inflate to."""
    result, elapsed, peak_mb = measured_fetch(
        server.url(path), FetchPolicy(allow_loopback=True, deadline_s=2.0, max_bytes=5_000_000))
    assert server.request_headers[server.requests.index(path)]["accept-encoding"] == "identity"
    assert result.ok, result.error
    assert result.headers["content-encoding"] == wrapper and result.headers["content-type"] == content_type
    assert result.data == server.encoding_bomb(wrapper)  # the compressed bytes, byte for byte
    assert len(result.data) < 3_000_000 and elapsed < 2.0
    assert peak_mb < 16  # the body and one copy; inflating would take 2,147 MB
    # and it is a real bomb: its first 64 KiB alone inflate to over 32 MB of zeros
    head = zlib.decompressobj(31 if wrapper == "gzip" else 15).decompress(result.data[:65536], 64 << 20)
    assert len(head) > 32 << 20 and head.count(0) == len(head)
    isize_or_adler = result.data[-4:]
    if wrapper == "gzip":
        assert int.from_bytes(isize_or_adler, "little") == ENCODING_BOMB_SIZE % 2**32


@pytest.mark.parametrize(
    "path, detail",
    [("/huge-header", "got more than 65536 bytes when reading header line"),
     ("/many-headers", "got more than 100 headers")],
)
def test_oversized_headers_fail_at_once_without_retries(server, path, detail):
    """A 1 MB header line or 5,000 header lines: a per-row failure saying so, stopped by
    http.client's limits after at most 64 KiB / 100 lines, and not retried (the server would
    answer the same)."""
    before = server.requests.count(path)
    result, elapsed, peak_mb = measured_fetch(server.url(path), FetchPolicy(allow_loopback=True, deadline_s=2.0, retries=2))
    assert result.reason == FAILED and result.data is None
    assert result.error == f"response headers too large: {detail}"
    assert not result.retryable
    assert server.requests.count(path) - before == 1
    assert elapsed < 1.0 and peak_mb < 2


def test_redirect_chain_within_limit_is_followed(server):
    result = fetch(server.url("/redirect-chain/5"), FetchPolicy(allow_loopback=True, max_redirects=5))
    assert result.ok and result.url.endswith("/redirect-chain/0")
    too_far = fetch(server.url("/redirect-chain/6"), FetchPolicy(allow_loopback=True, max_redirects=5))
    assert too_far.reason == FAILED and "more than 5 redirects" in too_far.error


def test_loopback_needs_the_flag(server, dialled):
    result = fetch(server.url("/ok.jpg"), FetchPolicy())
    assert result.reason == REFUSED and dialled == []


# --- opt-outs ---------------------------------------------------------------------------------


def _headers(*lines: str) -> http.client.HTTPMessage:
    return http.client.parse_headers(io.BytesIO("".join(f"{line}\r\n" for line in lines).encode() + b"\r\n"))


@pytest.mark.parametrize(
    "lines, token, opted_out",
    [
        (["X-Robots-Tag: noai"], None, True),
        (["X-Robots-Tag: noimageai"], None, True),
        (["X-Robots-Tag: noml"], None, True),
        (["X-Robots-Tag: none"], None, True),
        (["X-Robots-Tag: NoAI, nofollow"], None, True),
        (["X-Robots-Tag: noindex"], None, False),
        (["X-Robots-Tag: noindex, nofollow"], None, False),
        (["X-Robots-Tag: noindex", "X-Robots-Tag: noai"], None, True),
        (["X-Robots-Tag: otherbot: noai"], "pairsift", False),
        (["X-Robots-Tag: pairsift: noai"], "pairsift", True),
        (["X-Robots-Tag: PairSift: noimageai"], "pairsift", True),
        (["X-Robots-Tag: unavailable_after: 25 Jun 2010 15:00:00 PST"], None, False),
        (["tdm-reservation: 1"], None, True),
        (["tdm-reservation: 0"], None, False),
        (["Content-Type: image/jpeg"], None, False),
    ],
)
def test_opt_out_directives(lines, token, opted_out):
    assert (is_opted_out(_headers(*lines), token) is not None) == opted_out


def test_opt_out_is_checked_before_the_body_and_can_be_turned_off(server):
    refused = fetch(server.url("/robots?tag=noimageai"), LOOPBACK_OK)
    assert refused.reason == OPT_OUT and refused.data is None
    indexed = fetch(server.url("/robots?tag=noindex"), LOOPBACK_OK)
    assert indexed.ok
    ignored = fetch(server.url("/noai"), FetchPolicy(allow_loopback=True, respect_opt_out=False))
    assert ignored.ok and ignored.data == server.images["ok.jpg"]


# --- retries and DNS caching ------------------------------------------------------------------


def test_transient_failures_are_retried_and_client_errors_are_not(server):
    key = f"k{time.monotonic_ns()}"
    once = fetch(server.url(f"/flaky?key={key}&fail=1"), FetchPolicy(allow_loopback=True, retries=0))
    assert once.reason == FAILED and "503" in once.error
    again = fetch(server.url(f"/flaky?key={key}x&fail=1"), FetchPolicy(allow_loopback=True, retries=1))
    assert again.ok
    before = server.requests.count("/404")
    fetch(server.url("/404"), FetchPolicy(allow_loopback=True, retries=3))
    assert server.requests.count("/404") - before == 1


def test_caching_resolver_caches_answers_and_failures_for_its_ttl():
    calls: list[str] = []

    def counting(host: str) -> list[str]:
        calls.append(host)
        return fake_resolver(host)

    cache = CachingResolver(counting, ttl_s=0.2)
    assert cache("internal.test") == ["10.0.0.1"]
    assert cache("internal.test") == ["10.0.0.1"]
    for _ in range(2):
        with pytest.raises(OSError):
            cache("nowhere.test")
    assert calls == ["internal.test", "nowhere.test"]
    time.sleep(0.25)
    cache("internal.test")
    assert calls == ["internal.test", "nowhere.test", "internal.test"]


def test_caching_resolver_evicts_the_oldest_beyond_its_size():
    calls: list[str] = []
    cache = CachingResolver(lambda host: calls.append(host) or ["93.184.216.34"], ttl_s=60, max_entries=2)
    for host in ["a.test", "b.test", "c.test", "a.test"]:
        cache(host)
    assert calls == ["a.test", "b.test", "c.test", "a.test"]


def test_unsafe_characters_in_the_path_are_percent_encoded(server):
    result = fetch(server.url("/ok.jpg?name=caf\u00e9 au lait"), LOOPBACK_OK)
    assert result.ok, result.error
    assert server.requests[-1] == "/ok.jpg?name=caf%C3%A9%20au%20lait"
