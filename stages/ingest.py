"""Ingest: read a URL list (or existing webdataset tars) and cut it into input shards with uids.

Every row gets a ``uid`` (32 hex chars of blake2b over url and caption) and two flags the text filter
turns into reasons: ``dup_url`` (the url appeared earlier in the pool) and ``dup_url_caption`` (the
exact pair appeared earlier). An exact repeat gets the uid of its pair plus its repeat number, so that
every input row keeps its own line in the catalog.

Dedup is exact (up to 64-bit digests) and happens here because ingest is the one place that sees
the whole pool in order; it keeps one 8-byte digest per distinct url and pair in memory, in numpy hash
tables (``DigestCounts``: 18-36 bytes per distinct digest and table). Measured with mostly distinct
rows (benchmarks/scale.py), peak memory grows about 80 bytes per row, table doubling included: 10M
rows ~0.7 GB; 1B rows would need ~55-65 GB in this one process.

``spread_domains`` deals each domain's rows over all the shards (``_spread_shards``), so that the
download stage meets a big domain a little in every shard instead of one worker crawling its whole
run; uids and duplicate flags are still assigned in input order, exactly as without it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairsift.common.storage import AnyPath
from pairsift.stages.base import Contract
from pairsift.stages.readers import (
    BAD_ENCODING,
    INGEST_REASON,
    READER_REASON,
    TarLimits,
    as_text,
    input_files,
    read_batches,
)
from pairsift.stages.spread import spread_by_domain, url_hosts

# Rows a domain spread holds in memory at once: the spill buffer, then one bucket of shards
# (more for pools past SPREAD_MEMORY_ROWS x _MAX_SPILL_BUCKETS rows, to keep the bucket files few).
SPREAD_MEMORY_ROWS = 500_000
_MAX_SPILL_BUCKETS = 256
SOURCE_PREFIX = "source_"  # every input column but url and caption is kept under this prefix


def uid_of(url: str | None, caption: str | None, repeat: int = 0) -> str:
    text = f"{url or ''}\x00{caption or ''}"
    if repeat:
        text += f"\x00{repeat}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _normalise(table: pa.Table, url_col: str, caption_col: str | None, source: AnyPath) -> pa.Table:
    """``url``, ``caption`` (null for a URL-only list), every other input column as ``source_<name>``
    (so none can collide with a column pairsift writes), and ``ingest_reason``."""
    names = [n for n in table.column_names if n != READER_REASON]
    for wanted, key in ((url_col, "url_col"), (caption_col, "caption_col")):
        if wanted is not None and wanted not in names:
            hint = "; for a URL-only list set input.caption_col: null" if key == "caption_col" else ""
            raise ValueError(f"{source}: column {wanted!r} not found (set input.{key}{hint}); "
                             f"columns are: {_listed(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: duplicate column names: {_listed(names)}")
    url, bad_url = as_text(table.column(url_col))
    if caption_col is None:
        caption, bad_caption = pa.chunked_array([pa.nulls(table.num_rows, pa.string())]), bad_url
    else:
        caption, bad_caption = as_text(table.column(caption_col))
    columns = {"url": url, "caption": caption}
    columns.update({SOURCE_PREFIX + n: table.column(n) for n in names if n not in (url_col, caption_col)})
    earlier = table.column(READER_REASON).to_pylist() if READER_REASON in table.column_names \
        else [None] * table.num_rows
    reasons = [e or (BAD_ENCODING if u or c else None) for e, u, c in zip(earlier, bad_url, bad_caption)]
    columns[INGEST_REASON] = pa.array(reasons, pa.string())
    return pa.table(columns)


def _listed(names: list[str], most: int = 20) -> str:
    """Column names for a one-line message: odd ones (newlines, control bytes) quoted, long lists cut."""
    shown = [n if n.isprintable() and n.strip() == n and n else repr(n) for n in names[:most]]
    return ", ".join(shown) + (f", ... ({len(names)} columns)" if len(names) > most else "")


class DigestCounts:
    """How often each 64-bit digest has been seen, in two flat numpy arrays: an open-addressing hash
    table (linear probing, kept at most 2/3 full) of 12 bytes a slot, i.e. 18-36 bytes per distinct
    digest, where a Python set or dict of bytes took about 170 per row. Batches are looked up and
    inserted with vectorised probing rounds, so it is also faster than a per-row set."""

    def __init__(self, capacity: int = 1 << 16):
        capacity = 1 << max(4, (capacity - 1).bit_length())
        self.keys = np.zeros(capacity, np.uint64)  # 0 marks an empty slot (a digest of 0 counts as 1)
        self.counts = np.zeros(capacity, np.uint32)
        self.size = 0

    def add(self, digests: np.ndarray) -> np.ndarray:
        """Count ``digests`` in; returns, per digest, how often it was seen before it (in earlier
        calls, and earlier in this one)."""
        keys = np.where(digests == 0, np.uint64(1), digests.astype(np.uint64, copy=False))
        unique, inverse, per_key = np.unique(keys, return_inverse=True, return_counts=True)
        if (self.size + len(unique)) * 3 > len(self.keys) * 2:
            self._grow(self.size + len(unique))
        slots = self._slots(unique)
        before = self.counts[slots].astype(np.int64)
        self.counts[slots] += per_key.astype(np.uint32)
        # Occurrence number of each digest among this call's equal ones, in input order.
        within = np.empty(len(keys), np.int64)
        within[np.argsort(inverse, kind="stable")] = np.arange(len(keys)) - np.repeat(
            np.cumsum(per_key) - per_key, per_key)
        return before[inverse] + within

    def _slots(self, unique: np.ndarray) -> np.ndarray:
        """The slot of each (distinct) key, claiming an empty one for keys not in the table yet."""
        mask = len(self.keys) - 1
        slots = np.empty(len(unique), np.int64)
        todo = np.arange(len(unique))
        probe = (unique & np.uint64(mask)).astype(np.int64)
        while len(todo):
            here = self.keys[probe]
            done = here == unique[todo]
            empty = np.flatnonzero(here == 0)
            if len(empty):  # several keys may reach one empty slot in the same round: the first wins
                _, first = np.unique(probe[empty], return_index=True)
                claim = empty[first]
                self.keys[probe[claim]] = unique[todo[claim]]
                self.size += len(claim)
                done[claim] = True
            slots[todo[done]] = probe[done]
            todo, probe = todo[~done], (probe[~done] + 1) & mask
        return slots

    def _grow(self, needed: int) -> None:
        used = self.keys != 0
        keys, counts = self.keys[used], self.counts[used]
        capacity = len(self.keys)
        while needed * 3 > capacity * 2:
            capacity *= 2
        self.keys = np.zeros(capacity, np.uint64)
        self.counts = np.zeros(capacity, np.uint32)
        self.size = 0
        self.counts[self._slots(keys)] = counts


class UidAssigner:
    """Assigns uids and duplicate flags in input order, remembering what the pool has shown so far:
    an 8-byte digest per distinct url and per distinct pair (the first half of its uid's digest)."""

    def __init__(self) -> None:
        self.urls = DigestCounts()
        self.pairs = DigestCounts()

    def __call__(self, table: pa.Table) -> pa.Table:
        urls = table.column("url").to_pylist()
        captions = table.column("caption").to_pylist()
        url_digests, pair_digests, uids = [], [], []
        blake2b = hashlib.blake2b
        for url, caption in zip(urls, captions):
            url = url or ""
            pair = blake2b(f"{url}\x00{caption or ''}".encode("utf-8", "surrogatepass"), digest_size=16).digest()
            pair_digests.append(pair[:8])
            uids.append(pair.hex())  # = uid_of(url, caption)
            url_digests.append(blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest())
        seen = self.urls.add(np.frombuffer(b"".join(url_digests), np.uint64))
        repeats = self.pairs.add(np.frombuffer(b"".join(pair_digests), np.uint64))
        for i in np.flatnonzero(repeats).tolist():  # an exact repeat: its pair's uid plus its number
            uids[i] = uid_of(urls[i], captions[i], int(repeats[i]))
        return (
            table.add_column(0, "uid", pa.array(uids, pa.string()))
            .append_column("dup_url", pa.array(seen > 0))
            .append_column("dup_url_caption", pa.array(repeats > 0))
        )


def iter_input_shards(
    path: str | AnyPath, fmt: str = "auto", url_col: str = "url", caption_col: str | None = "caption",
    shard_size: int = 10_000, spread_domains: bool = False, spill_dir: str | Path | None = None,
    limits: TarLimits = TarLimits(),
) -> Iterator[pa.Table]:
    """Yield the input as consecutive shards of ``shard_size`` rows, each with uid and dup flags.

    ``path`` is a file, a folder or a glob (see ``readers.input_files``); ``caption_col`` None
    reads a URL-only list. With ``spread_domains`` each domain's rows are dealt over all the
    shards (see ``_spread_shards``; it spills the pool once to a temporary folder under
    ``spill_dir``, default the system's). Raises ValueError (one line) for a missing file, an
    unknown format, missing columns or a file that cannot be read."""
    files, fmt = input_files(path, fmt)
    if fmt == "txt":  # a URL list has no caption column
        caption_col = None

    def read() -> Iterator[pa.Table]:
        for file in files:
            for table in read_batches(file, fmt, limits):
                yield table if fmt == "webdataset" else _normalise(table, url_col, caption_col, file)

    if spread_domains:
        yield from _spread_shards(read, shard_size, spill_dir)
        return
    assign = UidAssigner()
    pending: list[pa.Table] = []
    pending_rows = 0
    for batch in read():
        pending.append(assign(batch))
        pending_rows += batch.num_rows
        while pending_rows >= shard_size:
            merged = _concat(pending)
            yield merged.slice(0, shard_size)
            rest = merged.slice(shard_size)
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
    if pending_rows:
        yield _concat(pending)


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Files of one input may differ in their extra columns or types: a clash is one line."""
    try:
        return pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"the input's files do not share a schema: {str(exc).splitlines()[0]}") from None


# --- spreading domains over the shards ---------------------------------------------------------

_SHARD, _SLOT = "__spread_shard", "__spread_slot"


def _spread_shards(read: Callable[[], Iterator[pa.Table]], shard_size: int,
                   spill_dir: str | Path | None) -> Iterator[pa.Table]:
    """Shards in which every domain's rows are dealt over all N = ceil(rows / shard_size) shards.

    Lay the pool out grouped by domain (domains in order of first appearance, each domain's rows in
    input order) and deal that sequence like cards: grouped position g goes to shard g mod N. A
    domain of c rows thus puts floor(c/N) or ceil(c/N) rows in every shard, and shards hold
    rows // N or rows // N + 1 rows. Inside a shard, rows go round-robin over its domains
    (``spread_by_domain``). When the rows are a whole number of shards this is exactly
    ``spread_by_domain(pool, N)``, without ever holding the pool.

    Memory stays bounded, at the cost of reading the input twice and writing it once to disk:
    pass 1 counts rows per domain (memory per distinct domain, never per row); pass 2 assigns uids
    and dup flags in input order (exactly as without spreading), computes each row's shard and slot
    from its domain's offset and its rank within the domain, and appends rows to bucket files, each
    covering a run of consecutive shards; pass 3 reads one bucket at a time and yields its shards.
    About ``SPREAD_MEMORY_ROWS`` rows are buffered or loaded at once (or one shard, if shards are
    bigger; or 1/256 of the pool past 128M rows, so that the buckets stay 256 files), on top of
    the dedup digests every ingest keeps. The first shard comes out only after the whole input has
    been read twice. A bounded sliding window (spread within each run of W shards) would need one pass and no
    disk, but a domain clustered in the input would then hit W workers at once, and spreading only
    helps politeness if a domain's rows are diluted over the whole run."""
    deal = _DomainDeal(read(), shard_size)
    if deal.rows == 0:
        return
    shards_per_bucket = max(1, SPREAD_MEMORY_ROWS // shard_size, -(-deal.n_shards // _MAX_SPILL_BUCKETS))
    n_buckets = -(-deal.n_shards // shards_per_bucket)
    # A hidden ".tmp" name: a run directory's sweep of temporaries removes a spill a killed ingest left.
    with tempfile.TemporaryDirectory(prefix=".spread-", suffix=".tmp", dir=spill_dir) as folder:
        spill = _Spill(Path(folder), n_buckets, max(shard_size, SPREAD_MEMORY_ROWS))
        assign = UidAssigner()
        for batch in read():
            shard, slot = deal.place(batch.column("url"))
            batch = assign(batch).append_column(_SHARD, pa.array(shard)).append_column(_SLOT, pa.array(slot))
            spill.add(batch, shard // shards_per_bucket)
        spill.flush()
        deal.check_complete()
        for bucket in range(n_buckets):
            table = spill.take(bucket)
            shards = table.column(_SHARD).to_numpy()
            order = np.lexsort((table.column(_SLOT).to_numpy(), shards))
            shards = shards[order]
            table = table.drop_columns([_SHARD, _SLOT])
            starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
            for start, stop in zip(starts, [*starts[1:], len(shards)]):  # copy one shard at a time
                yield spread_by_domain(table.take(pa.array(order[start:stop])), 1).combine_chunks()


class _DomainDeal:
    """Where each row goes: pass 1 (the constructor) counts rows per domain, ``place`` then turns a
    batch's hosts into (shard, slot) in input order."""

    def __init__(self, batches: Iterator[pa.Table], shard_size: int):
        counts: dict[str, int] = {}  # insertion order = order of first appearance
        for batch in batches:
            hosts = pc.dictionary_encode(url_hosts(batch.column("url")))
            per_host = np.bincount(hosts.indices.to_numpy(zero_copy_only=False), minlength=len(hosts.dictionary))
            for host, count in zip(hosts.dictionary.to_pylist(), per_host.tolist()):
                counts[host] = counts.get(host, 0) + count
        self.ids = {host: i for i, host in enumerate(counts)}
        sizes = np.fromiter(counts.values(), np.int64, len(counts))
        self.offsets = np.cumsum(sizes) - sizes  # where each domain's run starts when grouped
        self.sizes = sizes
        self.taken = np.zeros(len(counts), np.int64)  # rows of each domain placed so far
        self.rows = int(sizes.sum())
        self.n_shards = max(1, -(-self.rows // shard_size))

    def place(self, urls: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        hosts = pc.dictionary_encode(url_hosts(urls))
        try:
            known = np.array([self.ids[h] for h in hosts.dictionary.to_pylist()], np.int64)
        except KeyError:
            raise ValueError("the input changed while it was being read twice (spread_domains)") from None
        ids = known[hosts.indices.to_numpy(zero_copy_only=False)]
        # Rank of each row among this batch's rows of its domain, in input order.
        order = np.argsort(ids, kind="stable")
        grouped = ids[order]
        position = np.arange(len(ids))
        first = np.maximum.accumulate(np.where(np.r_[True, grouped[1:] != grouped[:-1]], position, 0))
        within = np.empty(len(ids), np.int64)
        within[order] = position - first
        grouped_position = self.offsets[ids] + self.taken[ids] + within
        unique, counts = np.unique(ids, return_counts=True)
        self.taken[unique] += counts
        if np.any(self.taken[unique] > self.sizes[unique]):
            raise ValueError("the input changed while it was being read twice (spread_domains)")
        return grouped_position % self.n_shards, grouped_position // self.n_shards

    def check_complete(self) -> None:
        if not np.array_equal(self.taken, self.sizes):
            raise ValueError("the input changed while it was being read twice (spread_domains)")


class _Spill:
    """Rows bucketed on disk. Each bucket is one file of length-prefixed Arrow IPC streams, appended
    to whenever the buffered rows reach ``buffer_rows``: files stay few (one per bucket) and none
    is held open."""

    def __init__(self, folder: Path, n_buckets: int, buffer_rows: int):
        self.paths = [folder / f"bucket-{b:05d}.arrows" for b in range(n_buckets)]
        self.buffer_rows = buffer_rows
        self.buffers: dict[int, list[pa.Table]] = {}
        self.buffered = 0

    def add(self, table: pa.Table, buckets: np.ndarray) -> None:
        order = np.argsort(buckets, kind="stable")
        table, buckets = table.take(pa.array(order)), buckets[order]
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        for start, stop in zip(starts, [*starts[1:], len(buckets)]):
            self.buffers.setdefault(int(buckets[start]), []).append(table.slice(start, stop - start))
        self.buffered += table.num_rows
        if self.buffered >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        for bucket, tables in self.buffers.items():
            table = pa.concat_tables(tables, promote_options="permissive")
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            data = sink.getvalue()
            with open(self.paths[bucket], "ab") as handle:
                handle.write(len(data).to_bytes(8, "little"))
                handle.write(data)
        self.buffers.clear()
        self.buffered = 0

    def take(self, bucket: int) -> pa.Table:
        """The bucket's rows, as chunks over the bytes read (no copy); its file is deleted, so disk
        use shrinks as shards go out."""
        tables = []
        with open(self.paths[bucket], "rb") as handle:
            while header := handle.read(8):
                data = pa.py_buffer(handle.read(int.from_bytes(header, "little")))
                tables.append(pa.ipc.open_stream(data).read_all())
        os.unlink(self.paths[bucket])
        return pa.concat_tables(tables, promote_options="permissive")


# What ingest writes, in the same terms as a stage's contract: the engine checks later stages' reads
# against it. Input columns beyond url and caption are kept too (as ``source_<name>``), but no stage
# may rely on them.
INGEST_CONTRACT = Contract(
    writes={"uid": pa.string(), "url": pa.string(), "caption": pa.string(), "dup_url": pa.bool_(),
            "dup_url_caption": pa.bool_(), "ingest_reason": pa.string()},
    bulky=("dup_url", "dup_url_caption"),
)
