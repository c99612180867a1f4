"""Ingest: every supported list format, column mapping, uids, duplicate flags, bad input."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pairsift.stages import ingest
from pairsift.stages.base import IMAGE
from pairsift.stages.ingest import DigestCounts, iter_input_shards, uid_of
from pairsift.stages.spread import spread_by_domain, url_hosts

ROWS = [
    {"URL": "http://a/1.jpg", "TEXT": "a red circle", "width": 10},
    {"URL": "http://a/2.jpg", "TEXT": "a blue square", "width": 20},
    {"URL": "http://a/1.jpg", "TEXT": "a red circle", "width": 10},  # exact repeat
    {"URL": "http://a/1.jpg", "TEXT": "another caption", "width": 10},  # same url, new caption
    {"URL": "http://a/3.jpg", "TEXT": "tab\there, \"quoted\"", "width": 30},
]


def write(path, fmt):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
        return
    if fmt == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in ROWS)
    else:
        import csv

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(ROWS[0]), delimiter="\t" if fmt == "tsv" else ",")
        writer.writeheader()
        writer.writerows(ROWS) if fmt == "csv" else [
            buffer.write("\t".join(str(r[k]).replace("\t", " ") for k in r) + "\n") for r in ROWS]
        text = buffer.getvalue()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)


@pytest.mark.parametrize("name", ["l.parquet", "l.csv", "l.tsv", "l.jsonl", "l.csv.gz", "l.jsonl.gz", "l.tsv.gz"])
def test_formats_mapping_uids_and_dup_flags(tmp_path, name):
    path = tmp_path / name
    write(path, name.split(".")[1])
    shards = list(iter_input_shards(path, url_col="URL", caption_col="TEXT", shard_size=2))
    assert [s.num_rows for s in shards] == [2, 2, 1]
    table = pa.concat_tables(shards)
    assert table.column("url").to_pylist() == [r["URL"] for r in ROWS]
    assert "source_width" in table.column_names and "width" not in table.column_names  # kept, prefixed
    assert table.column("dup_url").to_pylist() == [False, False, True, True, False]
    assert table.column("dup_url_caption").to_pylist() == [False, False, True, False, False]
    uids = table.column("uid").to_pylist()
    assert uids[0] == uid_of("http://a/1.jpg", "a red circle")
    assert uids[2] == uid_of("http://a/1.jpg", "a red circle", 1) != uids[0]  # every row keeps its own uid
    assert len(set(uids)) == 5 and all(len(u) == 32 for u in uids)


def test_uids_are_stable_across_shard_sizes(tmp_path):
    write(tmp_path / "l.parquet", "parquet")
    a = pa.concat_tables(iter_input_shards(tmp_path / "l.parquet", url_col="URL", caption_col="TEXT", shard_size=1))
    b = pa.concat_tables(iter_input_shards(tmp_path / "l.parquet", url_col="URL", caption_col="TEXT", shard_size=100))
    assert a.column("uid") == b.column("uid")


def test_missing_column_and_file_are_one_line_errors(tmp_path):
    write(tmp_path / "l.parquet", "parquet")
    with pytest.raises(ValueError, match=r"column 'url' not found \(set input.url_col\); columns are: URL, TEXT"):
        list(iter_input_shards(tmp_path / "l.parquet"))
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_input_shards(tmp_path / "nope.parquet"))
    (tmp_path / "l.xyz").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        list(iter_input_shards(tmp_path / "l.xyz"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="cannot read as parquet"):
        list(iter_input_shards(tmp_path / "broken.parquet"))


def test_hostile_values_become_rows_not_crashes(tmp_path):
    lines = [{"url": 12345, "caption": "x" * 1_000_000}, {"url": "http://a/\x00", "caption": "nul\x00byte"},
             {"url": None, "caption": None}, {"url": ["a", "list"], "caption": {"an": "object"}}]
    jsonl = tmp_path / "h.jsonl"
    jsonl.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in lines)
                      + b'{"url": "http://a/\xff\xfe", "caption": "bad utf8"}\n')
    table = pa.concat_tables(iter_input_shards(jsonl))
    assert table.num_rows == 5
    assert table.column("url").to_pylist()[:4] == ["12345", "http://a/\x00", None, None]
    assert len(table.column("caption").to_pylist()[0]) == 1_000_000
    assert table.column("url").to_pylist()[4] == "http://a/\ufffd\ufffd"
    (tmp_path / "broken.jsonl").write_text('{"url": "a", "caption": "b"}\n{not json\n[1]\n')
    broken = pa.concat_tables(iter_input_shards(tmp_path / "broken.jsonl"))
    assert broken.column("url").to_pylist() == ["a", None, None]
    assert broken.column("ingest_reason").to_pylist() == [None, "bad_json", "bad_json"]


def test_webdataset_input_keeps_images(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(buffer, "JPEG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key in ("000000000", "000000001"):
            for ext, data in (("jpg", buffer.getvalue()), ("txt", f"caption {key}".encode()),
                              ("json", json.dumps({"url": f"http://a/{key}.jpg"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = pa.concat_tables(iter_input_shards(tmp_path))
    assert table.column("url").to_pylist() == ["http://a/000000000.jpg", "http://a/000000001.jpg"]
    assert table.column("caption").to_pylist() == ["caption 000000000", "caption 000000001"]
    assert all(b[:3] == b"\xff\xd8\xff" for b in table.column(IMAGE).to_pylist())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({"url": st.one_of(st.none(), st.text()), "caption": st.one_of(st.none(), st.text())}),
                min_size=1, max_size=30), st.integers(1, 7))
def test_any_rows_ingest_in_order_with_unique_uids(tmp_path_factory, rows, shard_size):
    path = tmp_path_factory.mktemp("p") / "l.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("url", pa.string()), ("caption", pa.string())])), path)
    table = pa.concat_tables(iter_input_shards(path, shard_size=shard_size))
    assert table.num_rows == len(rows)
    assert table.column("caption").to_pylist() == [r["caption"] for r in rows]
    assert len(set(table.column("uid").to_pylist())) == len(rows)


# --- spread_domains: each domain dealt over the shards, uids and dup flags as without it -----------

def clustered_rows(n: int = 517, seed: int = 0) -> list[dict]:
    """A pool whose first 300 rows are one domain's run (a crawl dump), then a mix of a mid-size
    domain, many small ones, exact repeats, reused urls with new captions, a null and a hostless url."""
    rng = random.Random(seed)
    rows = [{"url": f"http://big.test/{i}.jpg", "caption": f"big {i}", "width": i} for i in range(300)]
    while len(rows) < n:
        roll = rng.random()
        if roll < 0.1:
            rows.append(dict(rng.choice(rows)))  # exact repeat of an earlier row
        elif roll < 0.15:
            rows.append({**rng.choice(rows), "caption": f"new caption {len(rows)}"})
        elif roll < 0.45:
            rows.append({"url": f"http://mid.test/{len(rows)}", "caption": f"mid {len(rows)}", "width": 1})
        else:
            host = f"s{rng.randrange(40)}.test"
            rows.append({"url": f"https://{host}/{len(rows)}.png", "caption": f"small {len(rows)}", "width": 2})
    rows[310] = {"url": None, "caption": "no url", "width": 3}
    rows[320] = {"url": "not a url", "caption": "no host", "width": 4}
    return rows


def write_rows(directory, rows: list[dict], fmt: str = "parquet"):
    path = directory / f"pool.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hosts_of(table: pa.Table) -> list[str]:
    return url_hosts(table.column("url")).to_pylist()


def rows_by_uid(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: row["uid"])


def check_spread(plain: pa.Table, shards: list[pa.Table], shard_size: int) -> None:
    """N = ceil(rows / shard_size) shards of rows//N or rows//N + 1; a domain of c rows has
    floor(c/N) or ceil(c/N) of them in every shard; the rows (uids, dup flags) are plain ingest's."""
    n = plain.num_rows
    n_shards = -(-n // shard_size)
    assert len(shards) == n_shards
    assert {s.num_rows for s in shards} <= {n // n_shards, -(-n // n_shards)}
    totals = Counter(hosts_of(plain))
    for shard in shards:
        here = Counter(hosts_of(shard))
        for host, total in totals.items():
            assert total // n_shards <= here[host] <= -(-total // n_shards), (host, here[host], total)
    assert rows_by_uid(pa.concat_tables(shards)) == rows_by_uid(plain)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_spread_domains_deals_every_domain_over_every_shard(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(ingest, "SPREAD_MEMORY_ROWS", 120)  # several buckets and several spill rounds
    path = write_rows(tmp_path, clustered_rows(), fmt)
    plain = pa.concat_tables(iter_input_shards(path, shard_size=50))
    spill = tmp_path / "spill"
    spill.mkdir()
    shards = list(iter_input_shards(path, shard_size=50, spread_domains=True, spill_dir=spill))
    check_spread(plain, shards, 50)
    big = Counter(hosts_of(plain))["big.test"]  # 300 in a run, plus repeats of them
    assert Counter(hosts_of(shards[0]))["big.test"] <= -(-big // 11) < 50  # without: 50 of shard 0's 50
    assert plain.column("dup_url_caption").to_pylist().count(True) > 10  # the pool does have repeats
    assert list(spill.iterdir()) == []  # the spill is gone once the last shard is out


def test_spread_is_spread_by_domain_of_the_whole_pool(tmp_path, monkeypatch):
    """On a whole number of shards the bounded-memory spread gives exactly the in-memory one,
    domains round-robin inside each shard included."""
    monkeypatch.setattr(ingest, "SPREAD_MEMORY_ROWS", 100)
    path = write_rows(tmp_path, clustered_rows(400))
    plain = pa.concat_tables(iter_input_shards(path, shard_size=40))
    spread = pa.concat_tables(iter_input_shards(path, shard_size=40, spread_domains=True, spill_dir=tmp_path))
    assert spread.equals(spread_by_domain(plain, 10))


def test_spread_stopped_early_removes_its_spill(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "SPREAD_MEMORY_ROWS", 100)
    path = write_rows(tmp_path, clustered_rows())
    spill = tmp_path / "spill"
    spill.mkdir()
    shards = iter_input_shards(path, shard_size=50, spread_domains=True, spill_dir=spill)
    assert next(shards).num_rows == 47
    assert list(spill.iterdir())  # buckets not yet read are on disk
    shards.close()
    assert list(spill.iterdir()) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e", "f"]), st.integers(0, 8)), min_size=1,
                max_size=80),
       st.integers(1, 9), st.integers(1, 30), st.integers(1, 4))
def test_any_pool_spreads_within_one_row_per_domain(tmp_path_factory, picks, shard_size, memory_rows, max_buckets):
    # few domains and few paths: many repeated urls and pairs
    rows = [{"url": f"http://{host}.test/{k}", "caption": f"c{k % 3}"} for host, k in picks]
    path = write_rows(tmp_path_factory.mktemp("p"), rows)
    plain = pa.concat_tables(iter_input_shards(path, shard_size=shard_size))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ingest, "SPREAD_MEMORY_ROWS", memory_rows)
        patch.setattr(ingest, "_MAX_SPILL_BUCKETS", max_buckets)  # buckets of more shards on big pools
        spread = list(iter_input_shards(path, shard_size=shard_size, spread_domains=True))
    check_spread(plain, spread, shard_size)


# --- the dedup memory: digests in numpy hash tables ---------------------------------------------

@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=60), min_size=1, max_size=6), st.integers(1, 64))
def test_digest_counts_count_like_a_counter(batches, capacity):
    # 41 digests whose low 16 bits are equal (all probe from one slot) plus 0 and 1, which share a key;
    # a tiny first capacity makes the table grow several times
    digests = np.array([0, 1] + [(k + 2) << 16 for k in range(39)], dtype=np.uint64)
    table, reference = DigestCounts(capacity), Counter()
    for batch in batches:
        want = []
        for k in batch:
            key = max(int(digests[k]), 1)
            want.append(reference[key])
            reference[key] += 1
        assert table.add(digests[np.array(batch, dtype=np.int64)]).tolist() == want
    assert table.size == len(reference)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["http://a/1", "http://a/2", "http://b/1", "", None]),
                          st.sampled_from(["x", "y", "", None])), min_size=1, max_size=40), st.integers(1, 7))
def test_uids_and_dup_flags_follow_their_definition(tmp_path_factory, pairs, shard_size):
    """uid = blake2b(url NUL caption [NUL n for the n-th repeat]); dup flags: seen earlier in the pool."""
    path = tmp_path_factory.mktemp("d") / "l.parquet"
    pq.write_table(pa.table({"url": pa.array([u for u, _ in pairs], pa.string()),
                             "caption": pa.array([c for _, c in pairs], pa.string())}), path)
    table = pa.concat_tables(iter_input_shards(path, shard_size=shard_size))
    seen_urls, repeats, want = set(), Counter(), []
    for url, caption in pairs:
        key = (url or "", caption or "")
        want.append((uid_of(url, caption, repeats[key]), key[0] in seen_urls, repeats[key] > 0))
        seen_urls.add(key[0])
        repeats[key] += 1
    got = zip(table.column("uid").to_pylist(), table.column("dup_url").to_pylist(),
              table.column("dup_url_caption").to_pylist())
    assert list(got) == want
