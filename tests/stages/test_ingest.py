"""Ingest: every supported list format, column mapping, uids, duplicate flags, bad input."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.base import IMAGE
from stages.ingest import iter_input_shards, uid_of

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
    assert "width" in table.column_names  # extra columns are kept
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
    (tmp_path / "broken.jsonl").write_text('{"url": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not a JSON object"):
        list(iter_input_shards(tmp_path / "broken.jsonl"))


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
