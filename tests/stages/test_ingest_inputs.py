"""img2dataset's input forms (folders, globs, .txt URL lists, URL-only), damaged encodings, and
webdataset tars built to exhaust memory (sparse members, gzip bombs, hostile json)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairsift.stages.base import IMAGE
from pairsift.stages.ingest import iter_input_shards
from pairsift.stages.readers import TarLimits
from pairsift.stages.text_filter import TextFilter, TextFilterConfig


def read_all(path, **options) -> pa.Table:
    return pa.concat_tables(iter_input_shards(path, **options))


def write_parts(folder, n_files=3, rows=4):
    folder.mkdir()
    for f in range(n_files):
        pq.write_table(pa.table({"url": [f"http://a/{f}/{i}" for i in range(rows)],
                                 "caption": [f"pic {f} {i}" for i in range(rows)]}), folder / f"part-{f}.parquet")
    return folder


# --- input forms ----------------------------------------------------------------------------------

def test_a_folder_of_parquet_reads_every_file_in_name_order_and_skips_private_ones(tmp_path):
    folder = write_parts(tmp_path / "data")
    (folder / "_SUCCESS").write_text("")
    pq.write_table(pa.table({"url": ["http://hidden"], "caption": ["x"]}), folder / "_metadata.parquet")
    table = read_all(folder)
    assert table.column("url").to_pylist() == [f"http://a/{f}/{i}" for f in range(3) for i in range(4)]


def test_a_glob_reads_the_files_it_matches(tmp_path):
    write_parts(tmp_path / "data")
    pq.write_table(pa.table({"url": ["http://other"], "caption": ["x"]}), tmp_path / "data/other.parquet")
    table = read_all(str(tmp_path / "data/part-*.parquet"))
    assert table.num_rows == 12 and "http://other" not in table.column("url").to_pylist()
    with pytest.raises(ValueError, match="matches no file"):
        read_all(str(tmp_path / "data/nothing-*.parquet"))


def test_a_folder_of_mixed_formats_is_a_one_line_error(tmp_path):
    write_parts(tmp_path / "data")
    (tmp_path / "data/more.csv").write_text("url,caption\nhttp://b,x\n")
    with pytest.raises(ValueError, match=r"files of one format .* found csv, parquet"):
        read_all(tmp_path / "data")
    assert read_all(tmp_path / "data", fmt="parquet").num_rows == 12  # an explicit format picks its files


def test_folders_of_csv_and_jsonl(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(2):
        (tmp_path / f"c/{i}.csv").write_text(f"url,caption\nhttp://c/{i},caption {i}\n")
    assert read_all(tmp_path / "c").column("url").to_pylist() == ["http://c/0", "http://c/1"]


def test_a_txt_url_list_has_urls_and_null_captions(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://a/1.jpg\n\n  http://a/2.jpg  \r\nhttp://a/1.jpg\n")
    table = read_all(path)
    assert table.column("url").to_pylist() == ["http://a/1.jpg", "http://a/2.jpg", "http://a/1.jpg"]
    assert table.column("caption").null_count == 3
    assert table.column("dup_url").to_pylist() == [False, False, True]


def test_url_only_parquet_with_caption_col_null(tmp_path):
    path = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": ["http://a/1", "http://a/2"], "WIDTH": [3, 4]}), path)
    with pytest.raises(ValueError, match="for a URL-only list set input.caption_col: null"):
        read_all(path)
    table = read_all(path, caption_col=None)
    assert table.column("caption").null_count == 2 and table.column("source_WIDTH").to_pylist() == [3, 4]


def test_the_text_filter_drops_null_captions_as_empty_caption(tmp_path):
    """A URL-only list has nothing to filter on: the text filter says so per row, it does not crash."""
    path = tmp_path / "urls.txt"
    path.write_text("http://a/1.jpg\nhttp://a/2.jpg\n")
    out = TextFilter(TextFilterConfig())(read_all(path))
    assert out.column("reason").to_pylist() == ["empty_caption", "empty_caption"]


# --- encodings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_one_invalid_byte_costs_one_value_not_the_column(tmp_path, fmt):
    sep = "\t" if fmt == "tsv" else ","
    lines = [f"http://a/{i}.jpg{sep}caption number {i}".encode() for i in range(2000)]
    lines[1234] = b"http://a/1234.jpg" + sep.encode() + b"caf\xe9 latte"  # latin-1, not UTF-8
    if fmt == "jsonl":
        lines = [b'{"url": "%s", "caption": "%s"}' % tuple(line.split(sep.encode(), 1)) for line in lines]
        body = b"\n".join(lines) + b"\n"
    else:
        body = f"url{sep}caption\n".encode() + b"\n".join(lines) + b"\n"
    path = tmp_path / f"l.{fmt}"
    path.write_bytes(body)
    table = read_all(path)
    assert table.num_rows == 2000 and table.column("caption").null_count == 0
    assert table.column("caption")[1234].as_py() == "caf\ufffd latte"
    assert table.column("caption")[1233].as_py() == "caption number 1233"
    reasons = table.column("ingest_reason").to_pylist()
    assert reasons[1234] == "bad_encoding" and reasons.count(None) == 1999


def test_a_binary_parquet_url_column_is_decoded_per_value(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"url": pa.array([b"http://a/1", b"http://a/\xff"], pa.binary()),
                             "caption": ["one", "two"]}), path)
    table = read_all(path)
    assert table.column("url").to_pylist() == ["http://a/1", "http://a/\ufffd"]
    assert table.column("ingest_reason").to_pylist() == [None, "bad_encoding"]


def test_csv_types_never_clash_between_blocks(tmp_path):
    """A column of numbers for the first 4 MB and then text used to fail the whole file."""
    rows = [f"http://a/{i},cap {i},{i}" for i in range(200_000)] + ["http://a/x,cap x,not a number"]
    path = tmp_path / "l.csv"
    path.write_text("url,caption,n\n" + "\n".join(rows) + "\n")
    table = read_all(path, shard_size=1_000_000)
    assert table.num_rows == 200_001 and table.column("source_n")[-1].as_py() == "not a number"


# --- webdataset limits ----------------------------------------------------------------------------

def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_hostile_json_and_oversized_members_are_per_row_reasons(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        samples = {
            "0": json.dumps({"url": "http://a/0.jpg"}).encode(),
            "1": json.dumps({"url": 12345}).encode(),
            "2": b"{not json",
            "3": b"[" * 200_000 + b"]" * 200_000,  # nesting past Python's recursion limit
            "4": json.dumps({"url": "http://a/4.jpg", "caption": "c" * 1_500_000}).encode(),
            "5": json.dumps(["a list"]).encode(),
        }
        for key, meta in samples.items():
            add(tar, f"{key}.jpg", b"\xff\xd8\xff" + b"x" * 100)
            add(tar, f"{key}.json", meta)
    table = read_all(tmp_path, limits=TarLimits(max_member_bytes=1 << 20))
    assert table.column("ingest_reason").to_pylist() == [None, "bad_url", "bad_json", "bad_json",
                                                         "member_too_large", "bad_json"]
    assert table.column("url").to_pylist()[:3] == ["http://a/0.jpg", "00000.tar/1", "00000.tar/2"]
    assert all(image is not None for image in table.column(IMAGE).to_pylist())


def test_img2dataset_json_fields_are_kept_as_source_columns(tmp_path):
    meta = {"url": "http://a/0.jpg", "caption": "c", "key": "000000000", "status": "success", "width": 8,
            "original_width": 640, "sha256": "ab" * 32, "exif": {"nested": 1}, "reason": "x"}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add(tar, "000000000.jpg", b"\xff\xd8\xff")
        add(tar, "000000000.json", json.dumps(meta).encode())
    row = read_all(tmp_path).to_pylist()[0]
    assert (row["url"], row["caption"], row["source_key"]) == ("http://a/0.jpg", "c", "000000000")
    assert (row["source_status"], row["source_width"], row["source_original_width"]) == ("success", "8", "640")
    assert row["source_sha256"] == "ab" * 32 and row["source_exif"] is None and row["source_reason"] == "x"
    assert "width" not in row and "reason" not in row


def test_the_per_tar_cap_is_a_one_line_error(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key in range(20):
            add(tar, f"{key}.jpg", b"\xff\xd8\xff" + bytes(10_000))
    with pytest.raises(ValueError, match=r"over input.max_tar_bytes \(50,000 bytes read\)"):
        read_all(tmp_path, limits=TarLimits(max_tar_bytes=50_000))


def gzip_bomb(path, inflated: int):
    """A .tar.gz of one member of ``inflated`` zero bytes, written without holding it (~1 MB per GB)."""
    info = tarfile.TarInfo("0.jpg")
    info.size = inflated
    squeeze = zlib.compressobj(6, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(squeeze.compress(info.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(inflated >> 20):
            out.write(squeeze.compress(zeros))
        out.write(squeeze.compress(bytes(1024 * 2)))  # end-of-archive blocks
        out.write(squeeze.flush())


# Peak RSS from /proc's VmHWM: getrusage's ru_maxrss survives fork + exec, so a child started from
# pytest would report pytest's own peak.
PEAK_RSS = textwrap.dedent("""
    import re, sys
    import pyarrow as pa
    from pairsift.stages.ingest import iter_input_shards
    try:
        table = pa.concat_tables(iter_input_shards(sys.argv[1], fmt="webdataset"))
        print("rows", table.num_rows, table.column("ingest_reason").to_pylist())
    except ValueError as exc:
        print("error", str(exc))
    status = open("/proc/self/status").read()
    print("rss_mb", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
""")


def peak_rss_run(path) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True,
                            timeout=300, check=True)
    lines = result.stdout.strip().splitlines()
    return lines[0], int(lines[-1].split()[1])


def test_a_gzip_bomb_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    gzip_bomb(path, 3 << 29)
    assert path.stat().st_size < 2 << 20  # ~1.5 MB on disk, 1.5 GiB inflated
    outcome, rss_mb = peak_rss_run(path)
    assert outcome == "rows 1 ['member_too_large']"
    assert rss_mb < 500


def test_a_sparse_tar_declaring_gigabytes_is_refused_in_bounded_memory(tmp_path):
    big = tmp_path / "0.jpg"
    with open(big, "wb") as handle:  # a 4 GiB file of holes: no disk used
        handle.truncate(4 << 30)
    path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(path), "-C", str(tmp_path), "0.jpg"], check=True)
    big.unlink()
    assert path.stat().st_size < 100_000
    outcome, rss_mb = peak_rss_run(path)
    assert outcome == "rows 1 ['member_too_large']"
    assert rss_mb < 500


def test_a_run_whose_input_is_all_damaged_says_so_in_one_line(tmp_path, caplog):
    from pairsift.pipeline.config import parse_config
    from pairsift.pipeline.run_dir import RunDir
    from pairsift.pipeline.runner import ingest

    path = tmp_path / "latin1.csv"
    path.write_bytes(b"url,caption\n" + b"".join(b"http://a/%d,caf\xe9 %d\n" % (i, i) for i in range(50)))
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "input": {"path": str(path)}})
    with caplog.at_level("WARNING"):
        assert ingest(cfg, RunDir(tmp_path / "run"), "h") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"ingest: {path}: 50 of 50 rows have ingest_reason bad_encoding "
                        "(every row: check the input's encoding or format)"]
    manifest = json.loads((RunDir(tmp_path / "run").stage_dir("ingest") / "_manifest.json").read_text())
    assert manifest["ingest_reasons"] == {"bad_encoding": 50}
