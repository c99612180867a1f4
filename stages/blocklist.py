"""Known-bad lists: URLs and domains checked before anything is fetched (``url_blocklist``), and
image hashes checked once the bytes are here (``hash_blocklist``).

An operator supplies lists (CSAM hash-list vendors, takedown requests, opt-out registries, their own
policy) as files: ``.txt`` (one entry a line, ``#`` comments), ``.csv`` or ``.parquet`` (the column
named by ``column``, else the first). Each list is one of three kinds:

* ``url``: exact URLs, compared after normalising what does not change the resource (scheme and host
  case, a default port, the fragment);
* ``host``: a host name blocks itself and every subdomain (``example.com`` blocks ``a.example.com``);
* ``registered_domain``: a URL is blocked when its registered domain (eTLD+1, from the Public Suffix
  List that ships inside the ``publicsuffixlist`` wheel, MPL-2.0) is on the list, so ``a.example.co.uk``
  and ``b.example.co.uk`` are one entry ``example.co.uk``.

A match is dropped with reason ``blocklisted`` and the list's name in ``blocklist``; rows are never
fetched, so nothing of theirs reaches a tar or the report.
"""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from pydantic import Field

from pairsift.common.storage import as_path, read_parquet
from pairsift.stages.base import IMAGE, Contract, Stage, StageConfig, with_reason

BLOCKLISTED = "blocklisted"
BLOCKLIST = "blocklist"
DEFAULT_PORTS = {"http": 80, "https": 443}


class ListSpec(StageConfig):
    name: str = Field(min_length=1, description="recorded in the blocklist column of every row it blocks")
    path: str
    kind: Literal["url", "host", "registered_domain"]
    column: str | None = Field(None, description="csv/parquet column holding the entries; None = the first")


class UrlBlocklistConfig(StageConfig):
    lists: list[ListSpec] = Field(min_length=1)


def split_url(url: str) -> tuple[str, str, str] | None:
    """(scheme, host, normalised url) or None when ``url`` is not an absolute http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in DEFAULT_PORTS or not host:
        return None
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal keeps its brackets
        netloc = f"[{host}]" if port in (None, DEFAULT_PORTS[scheme]) else f"[{host}]:{port}"
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    return scheme, host, f"{scheme}://{netloc}{path}{query}"


@functools.cache
def _suffix_list():
    from publicsuffixlist import PublicSuffixList  # the list ships in the wheel: no download

    return PublicSuffixList()


def registered_domain(host: str) -> str:
    """eTLD+1 of a host name; an IP address or a bare public suffix is its own entry."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return _suffix_list().privatesuffix(host) or host


def _read_entries(spec: ListSpec | HashListSpec) -> list[str]:
    """The entries of one list file: txt lines (``#`` comments), or a csv/parquet column."""
    path = as_path(spec.path)
    suffix = Path(str(path)).suffix.lower()
    try:
        if suffix == ".parquet":
            table = read_parquet(path)
        elif suffix == ".csv":
            import pyarrow.csv as pacsv

            with path.open("rb") as handle:
                table = pacsv.read_csv(handle)
        else:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"blocklist {spec.name!r}: cannot read {spec.path}: {exc}") from None
    column = spec.column or table.column_names[0]
    if column not in table.column_names:
        raise ValueError(f"blocklist {spec.name!r}: {spec.path} has no column {column!r}")
    return [str(v).strip() for v in table.column(column).to_pylist() if v is not None and str(v).strip()]


class UrlBlocklist(Stage):
    name: ClassVar[str] = "url_blocklist"
    config_class: ClassVar[type[StageConfig]] = UrlBlocklistConfig
    stateful: ClassVar[bool] = True  # lists of millions of entries load once per worker
    cfg: UrlBlocklistConfig

    def __init__(self, cfg: UrlBlocklistConfig):
        super().__init__(cfg)
        self.entries: dict[str, dict[str, str]] | None = None  # kind -> entry -> list name

    def contract(self) -> Contract:
        return Contract(reads=("url",), writes={BLOCKLIST: pa.string()}, reasons=(BLOCKLISTED,),
                        private_reasons=(BLOCKLISTED,))

    def setup(self) -> None:
        entries: dict[str, dict[str, str]] = {"url": {}, "host": {}, "registered_domain": {}}
        for spec in self.cfg.lists:
            for entry in _read_entries(spec):
                key = _normalise_entry(spec.kind, entry)
                if key is not None:
                    entries[spec.kind].setdefault(key, spec.name)  # the first list that names it wins
        self.entries = entries

    def __call__(self, shard: pa.Table) -> pa.Table:
        if self.entries is None:
            self.setup()
        hits = [self.match(url) if isinstance(url, str) else None for url in shard.column("url").to_pylist()]
        shard = shard.append_column(BLOCKLIST, pa.array(hits, pa.string()))
        return with_reason(shard, [BLOCKLISTED if hit else None for hit in hits])

    def match(self, url: str) -> str | None:
        """The name of the first list that blocks ``url``, or None."""
        assert self.entries is not None
        parsed = split_url(url)
        if parsed is None:
            return None  # not fetchable anyway: the download stage says why
        _, host, normalised = parsed
        if hit := self.entries["url"].get(normalised):
            return hit
        hosts = self.entries["host"]
        labels = host.split(".")
        for start in range(len(labels)):  # the host itself, then each parent domain
            if hit := hosts.get(".".join(labels[start:])):
                return hit
        return self.entries["registered_domain"].get(registered_domain(host)) if self.entries["registered_domain"] else None


def _normalise_entry(kind: str, entry: str) -> str | None:
    if kind == "url":
        parsed = split_url(entry)
        return parsed[2] if parsed else None
    host = entry.lower().strip().rstrip(".")
    if "://" in host:  # a URL given where a domain was expected: take its host
        parsed = split_url(host)
        host = parsed[1] if parsed else ""
    return (registered_domain(host) if kind == "registered_domain" else host) or None


# --------------------------------------------------------------------------- image hash lists

HashKind = Literal["sha256", "md5", "phash", "pdq"]
HASH_BYTES = {"phash": 8, "pdq": 32}
DEFAULT_RADIUS = {"phash": 8, "pdq": 31}  # PDQ's authors suggest 31 of 256 bits


class HashListSpec(StageConfig):
    name: str = Field(min_length=1)
    path: str
    kind: HashKind
    column: str | None = None
    radius: int | None = Field(None, ge=0, le=64, description="Hamming radius for phash/pdq; None = the default")


class HashBlocklistConfig(StageConfig):
    lists: list[HashListSpec] = Field(min_length=1)
    max_side: int = Field(512, ge=32, description="images are shrunk to this longer side before hashing")


class HashLists:
    """Known-bad image hashes: exact sha256/md5 of the bytes, and pHash/PDQ within a radius."""

    def __init__(self, specs: list[HashListSpec]):
        from pairsift.stages.hash_index import HashIndex, as_hash_rows

        self.exact: dict[str, dict[str, str]] = {"sha256": {}, "md5": {}}
        self.perceptual: list[tuple[HashListSpec, int, object, list[str]]] = []
        for spec in specs:
            entries = [e.lower() for e in _read_entries(spec)]
            if spec.kind in self.exact:
                for entry in entries:
                    self.exact[spec.kind].setdefault(entry, spec.name)
                continue
            nbytes = HASH_BYTES[spec.kind]
            try:
                rows = as_hash_rows([bytes.fromhex(e.rjust(nbytes * 2, "0")) for e in entries], nbytes)
            except ValueError:
                raise ValueError(f"blocklist {spec.name!r}: {spec.path} holds entries that are not "
                                 f"{nbytes * 2}-digit hex {spec.kind} hashes") from None
            radius = DEFAULT_RADIUS[spec.kind] if spec.radius is None else spec.radius
            self.perceptual.append((spec, radius, HashIndex(rows, radius), entries))

    @property
    def kinds(self) -> set[str]:
        return {k for k, table in self.exact.items() if table} | {spec.kind for spec, *_ in self.perceptual}

    def match(self, hashes: dict) -> tuple[str, str] | None:
        """(list name, the listed hash that matched) for the first list that matches, else None."""
        for kind in ("sha256", "md5"):
            if (value := hashes.get(kind)) and (name := self.exact[kind].get(value)):
                return name, value
        for spec, _radius, index, entries in self.perceptual:
            value = hashes.get(spec.kind)
            if value is None:
                continue
            query = value.to_bytes(8, "big") if isinstance(value, int) else value
            found = index.within(np.frombuffer(query, np.uint8))  # type: ignore[attr-defined]
            if found:
                return spec.name, entries[found[0][0]]
        return None


class HashBlocklist(Stage):
    """Images whose hash is on a known-bad list: dropped with ``blocklisted``, the list in
    ``blocklist`` and the listed hash in ``blocklist_hash``. Runs on images already fetched (or
    given as webdataset input): its rows never reach the training shards and the report never shows
    them, but the download folder still holds what was fetched until ``pairsift takedown`` removes
    it (checking hash lists inside the download stage, before anything is written, is not built)."""

    name: ClassVar[str] = "hash_blocklist"
    config_class: ClassVar[type[StageConfig]] = HashBlocklistConfig
    stateful: ClassVar[bool] = True
    cfg: HashBlocklistConfig

    def __init__(self, cfg: HashBlocklistConfig):
        super().__init__(cfg)
        self.lists: HashLists | None = None

    def contract(self) -> Contract:
        return Contract(reads=(IMAGE,), writes={BLOCKLIST: pa.string(), "blocklist_hash": pa.string()},
                        reasons=(BLOCKLISTED,), private_reasons=(BLOCKLISTED,))

    def setup(self) -> None:
        self.lists = HashLists(self.cfg.lists)

    def __call__(self, shard: pa.Table) -> pa.Table:
        if self.lists is None:
            self.setup()
        assert self.lists is not None
        hits = [image_match(self.lists, data, self.cfg.max_side) if data else None
                for data in shard.column(IMAGE).to_pylist()]
        shard = shard.append_column(BLOCKLIST, pa.array([h[0] if h else None for h in hits], pa.string()))
        shard = shard.append_column("blocklist_hash", pa.array([h[1] if h else None for h in hits], pa.string()))
        return with_reason(shard, [BLOCKLISTED if h else None for h in hits])


def image_match(lists: HashLists, data: bytes, max_side: int = 512) -> tuple[str, str] | None:
    """Hash ``data`` the ways the lists need (cheap exact hashes first) and match it."""
    import hashlib

    from pairsift.stages.image_hashes import ImageHashes, ImageHashesConfig

    exact = {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data, usedforsecurity=False).hexdigest()}
    if hit := lists.match(exact):
        return hit
    perceptual = [k for k in ("phash", "pdq") if k in lists.kinds]
    if not perceptual:
        return None
    hashes = ImageHashes(ImageHashesConfig(perceptual=perceptual, max_side=max_side)).hashes(data)
    return lists.match(hashes) if hashes else None
