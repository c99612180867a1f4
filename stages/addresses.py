"""Which addresses the download stage may dial: IANA's special-purpose registries, as an explicit table.

A host is dialled only at a globally routable unicast address (loopback only when allowed). Numeric
host spellings (``2130706433``, ``0177.0.0.1``, ``0x7f.1``) are normalised as browsers and
``inet_aton`` read them, and an IPv6 address that carries an IPv4 one for a translator or tunnel
(IPv4-mapped, NAT64, 6to4, Teredo) is judged by that IPv4 address too. ``stages.fetch`` checks every
resolved address and redirect hop here before it opens a socket.
"""

from __future__ import annotations

import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The well-known NAT64 prefix (RFC 6052): the IPv4 address a gateway forwards to is the last 32 bits.
# The local-use prefix 64:ff9b:1::/48 (RFC 8215) may embed it at any of six bit offsets the
# operator picks, so it is refused outright (IANA: not globally reachable) rather than decoded.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IANA's IPv4 and IPv6 Special-Purpose Address Registries (2025 edition), plus multicast and the
# deprecated site-local prefix: every range here is refused, whatever ``ipaddress.is_global``
# thinks (Python 3.11.7's lets 192.0.0.0/24 through, CVE-2024-4032). The few anycast services the
# registries mark globally reachable (192.0.0.9, AS112, AMT, 2001:1::1...) are refused too: no
# image is served from them. Each entry: network, the word a refusal starts with, IANA's name;
# the first match names the refusal, so a narrower range comes before the one around it.
SPECIAL_PURPOSE: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, str], ...] = tuple(
    (ipaddress.ip_network(network), kind, name)
    for network, kind, name in (
        ("0.0.0.0/32", "unspecified", "this host"),
        ("0.0.0.0/8", "reserved", "this network"),
        ("10.0.0.0/8", "private", "private-use"),
        ("100.64.0.0/10", "not globally routable", "shared address space (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback", "loopback"),
        ("169.254.0.0/16", "link-local", "link local"),
        ("172.16.0.0/12", "private", "private-use"),
        ("192.0.0.0/24", "reserved", "IETF protocol assignments (DS-Lite, NAT64 discovery, ...)"),
        ("192.0.2.0/24", "reserved", "documentation (TEST-NET-1)"),
        ("192.31.196.0/24", "reserved", "AS112-v4"),
        ("192.52.193.0/24", "reserved", "AMT"),
        ("192.88.99.0/24", "reserved", "deprecated 6to4 relay anycast"),
        ("192.168.0.0/16", "private", "private-use"),
        ("192.175.48.0/24", "reserved", "direct delegation AS112 service"),
        ("198.18.0.0/15", "reserved", "benchmarking"),
        ("198.51.100.0/24", "reserved", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "reserved", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast", "multicast"),
        ("255.255.255.255/32", "reserved", "limited broadcast"),
        ("240.0.0.0/4", "reserved", "reserved"),
        ("::/128", "unspecified", "unspecified address"),
        ("::1/128", "loopback", "loopback address"),
        ("64:ff9b:1::/48", "private", "local-use IPv4/IPv6 translation"),
        ("100::/64", "reserved", "discard-only address block"),
        ("100:0:0:1::/64", "reserved", "dummy IPv6 prefix"),
        ("2001::/23", "reserved", "IETF protocol assignments (Teredo, ORCHID, benchmarking, ...)"),
        ("2001:db8::/32", "reserved", "documentation"),
        ("3fff::/20", "reserved", "documentation"),
        ("5f00::/16", "reserved", "segment routing (SRv6) SIDs"),
        ("fc00::/7", "private", "unique-local"),
        ("fe80::/10", "link-local", "link-local unicast"),
        ("fec0::/10", "private", "site-local (deprecated)"),
        ("ff00::/8", "multicast", "multicast"),
    )
)
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")  # IPv6 outside it is unassigned or special
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def parse_ipv4_number(host: str) -> ipaddress.IPv4Address | None:
    """Parse the inet_aton spellings browsers and libc accept: ``2130706433``, ``0177.0.0.1``,
    ``0x7f.1``, ``127.1``. Returns None when the host is a name; raises ValueError when it looks
    numeric (its last label is a number, as the WHATWG URL standard defines) but is not valid."""
    labels = host.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels = labels[:-1]  # one trailing dot is the DNS root, "10.0.0.1." means 10.0.0.1
    if not labels or not _NUMERIC_LABEL.match(labels[-1].lower()):
        return None
    if len(labels) > 4:
        raise ValueError(f"invalid IPv4 address {host!r}")
    numbers = [_parse_ipv4_label(label) for label in labels]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError(f"invalid IPv4 address {host!r}")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_label(label: str) -> int:
    label = label.lower()
    if label.startswith("0x"):
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        return int(label, 8)  # ValueError for "08": not a number in any spelling
    if not label.isdigit():
        raise ValueError(f"invalid IPv4 label {label!r}")
    return int(label)


def numeric_host(host: str) -> IPAddress | None:
    """The address a numeric host means (IPv6 with optional zone, or any IPv4 spelling), else None."""
    if ":" in host:
        return ipaddress.IPv6Address(host)  # ValueError if malformed; zones ("%eth0") are kept
    return parse_ipv4_number(host)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries for a translator or tunnel to reach."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress, allow_loopback: bool = False) -> str | None:
    """Why ``ip`` must not be dialled, or None when it is a global unicast address (or loopback
    that is allowed). The explicit ``SPECIAL_PURPOSE`` table decides; ``is_global`` is only a
    second opinion, since its own table has been wrong before (CVE-2024-4032)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            # Loopback is allowed only where the socket really stays on this host (::ffff:127.x);
            # a tunnel or NAT64 prefix around 127.0.0.1 leaves the machine.
            why = address_refusal(inner, allow_loopback and ip.ipv4_mapped is not None)
            if why:
                return f"{why} (embedded in {ip})"
            if ip.ipv4_mapped is not None or ip in _NAT64:
                return None  # ::ffff:a.b.c.d and NAT64 reach exactly that IPv4 address, which passed
            # 6to4, Teredo: the tunnel prefix itself must be acceptable too.
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    special = special_purpose(ip)
    if special:
        return special
    if isinstance(ip, ipaddress.IPv6Address) and ip not in GLOBAL_UNICAST_V6:
        return f"reserved: outside the global unicast block {GLOBAL_UNICAST_V6}"
    if not ip.is_global:
        return "not globally routable"
    return None


def special_purpose(ip: IPAddress) -> str | None:
    """``kind: IANA name (network)`` of the first special-purpose range holding ``ip``, else None."""
    for network, kind, name in SPECIAL_PURPOSE:
        if ip.version == network.version and ip in network:
            return f"{kind}: {name} ({network})"
    return None
