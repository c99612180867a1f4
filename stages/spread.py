"""Spreading a domain's rows over shards, so that no one download worker gets a big domain's whole run.

Called by ingest: per-worker politeness limits (stages/politeness.py) hold one domain to one worker's
limit, so a domain dealt over many shards is fetched by every worker at once instead of by one
for hours (past the shard deadline).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
