"""Ingest's domain spread: every shard gets its share of each domain, deterministically."""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pairsift.stages.spread import spread_by_domain, url_hosts


def table_of(urls: list) -> pa.Table:
    return pa.table({"row": list(range(len(urls))), "url": pa.array(urls, pa.string())})


def test_spread_by_domain_deals_each_domain_over_the_shards():
    # 9 rows of a, 3 of b, 1 of c, as a crawl list would have them: a's run first.
    urls = [f"http://a.test/{i}" for i in range(9)] + [f"http://b.test/{i}" for i in range(3)] + ["http://c.test/0"]
    out = [u.removeprefix("http://").replace(".test/", "") for u in spread_by_domain(table_of(urls), 3)
           .column("url").to_pylist()]
    # Shards of ceil(13 / 3) = 5 rows: 5, 5 and 3. a's 9 rows go 4/3/2 (their share is 3.5/3.5/2.1),
    # b's one per shard; inside each shard the domains take turns.
    assert out == ["a0", "b2", "a3", "a5", "a8",
                   "a1", "b0", "c0", "a4", "a6",
                   "a2", "b1", "a7"]


def test_spread_by_domain_exact_order_and_determinism():
    urls = ["http://A.test/1", "http://a.test/2", "http://b.test/1", "http://a.test/3", None, "not a url"]
    out = spread_by_domain(table_of(urls), 2)
    # Domains by first appearance: a (rows 0, 1, 3), b (2), none (4, 5). Dealt over two shards of 3:
    # shard 0 gets rows 0, 3, 4 and shard 1 rows 1, 2, 5; each then goes round-robin by domain.
    assert out.column("row").to_pylist() == [0, 4, 3, 1, 2, 5]
    assert spread_by_domain(table_of(urls), 2).equals(out)
    # With an explicit shard size (ingest's): three shards of 2 rows.
    assert spread_by_domain(table_of(urls), 3, shard_size=2).column("row").to_pylist() == [0, 2, 1, 4, 3, 5]


def test_url_hosts():
    urls = ["HTTP://User:pw@Img.Example.com:8080/a?b#c", "https://[2001:db8::1]:443/x", "//nohost/x",
            "mailto:x@y", None, "https://b.test", "http://c.test?q=1"]
    assert url_hosts(pa.array(urls, pa.string())).to_pylist() == [
        "img.example.com", "[2001:db8::1]", "", "", "", "b.test", "c.test"]


def test_spread_by_domain_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive integer"):
        spread_by_domain(table_of(["http://a/"]), 0)
    with pytest.raises(ValueError, match="no 'url' column"):
        spread_by_domain(pa.table({"x": [1]}), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        spread_by_domain(table_of(["http://a/"] * 5), 2, shard_size=2)
    assert spread_by_domain(table_of([]), 3).num_rows == 0


@settings(max_examples=150, deadline=None)
@given(
    domains=st.lists(st.integers(0, 6), min_size=1, max_size=120),
    n_shards=st.integers(1, 12),
)
def test_spread_by_domain_properties(domains, n_shards):
    urls = [f"http://d{d}.test/{i}" for i, d in enumerate(domains)]
    out = spread_by_domain(table_of(urls), n_shards).column("row").to_pylist()
    n = len(urls)
    assert sorted(out) == list(range(n))  # a permutation: nothing lost or repeated
    size = math.ceil(n / n_shards)
    totals = Counter(domains)
    for start in range(0, n, size):
        shard = out[start : start + size]
        share = len(shard) / n
        got = Counter(domains[r] for r in shard)
        for d, total in totals.items():
            assert abs(got[d] - total * share) < 2  # its share of every domain, within a row
        for d in got:  # a domain's rows keep their input order inside the shard
            rows = [r for r in shard if domains[r] == d]
            assert rows == sorted(rows)
