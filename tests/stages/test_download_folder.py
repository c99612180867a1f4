"""``<run>/download`` as img2dataset writes it, read by the tools its users point at such a folder.

A real (local-executor) run downloads from the hostile server on 127.0.0.1; then webdataset's own
reader, and DataComp's resharder's input logic, read the folder and are checked against the catalog.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from hostile_server import HostileServer
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener, valid_sample

from pairsift.pipeline.catalog import query
from pairsift.pipeline.config import parse_config
from pairsift.pipeline.runner import run_pipeline

# path -> img2dataset's status for it
SERVED = {
    "/ok.jpg": "success", "/ok.png": "success", "/ok.webp": "success", "/animated.gif": "success",
    "/cmyk.jpg": "success", "/exif-rotated.jpg": "success", "/404": "failed_to_download",
    "/status/500": "failed_to_download", "/html-as-jpeg": "failed_to_resize", "/eps-as-jpeg": "failed_to_resize",
    "/truncated.jpg": "failed_to_resize", "/noai": "failed_to_download",
}
SHARD_SIZE = 5
IMG2DATASET_KEYS = ["url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                    "original_height", "exif", "sha256"]


def download_run(root: Path, urls: list[str]):
    """A run config that downloads ``urls`` (captions numbered) into ``root / "run"``."""
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(len(urls))]}),
                   root / "urls.parquet")
    return parse_config({
        "run_dir": str(root / "run"),
        "input": {"path": str(root / "urls.parquet"), "shard_size": SHARD_SIZE},
        "executor": {"kind": "local", "max_retries": 0},
        "stages": [{"stage": "download", "image_size": 32, "encode_format": "jpg", "timeout_s": 5,
                    "deadline_s": 10, "thread_count": 4, "retries": 0, "allow_loopback": True}],
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("download_folder")
    with HostileServer() as server:
        run_pipeline(download_run(root, [server.url(path) for path in SERVED]))
    return root / "run"


def catalog(run: Path) -> dict[str, dict]:
    columns, rows = query(run, "SELECT uid, url, caption, status, reason, width, height, sha256 FROM samples")
    return {row[0]: dict(zip(columns, row)) for row in rows}


def test_statuses_in_the_catalog_are_img2datasets(run):
    rows = catalog(run)
    assert Counter(row["status"] for row in rows.values()) == Counter(SERVED.values())
    for row in rows.values():
        path = "/" + row["url"].split("/", 3)[3]
        assert row["status"] == SERVED[path], (path, row["reason"])
        assert (row["reason"] is None) == (row["status"] == "success")


def test_webdataset_reads_every_success_with_img2datasets_json_keys(run):
    rows = catalog(run)
    tars = sorted(str(p) for p in (run / "download").glob("[0-9]*.tar"))
    assert len(tars) == -(-len(SERVED) // SHARD_SIZE)
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(u for u, r in rows.items() if r["status"] == "success")
    for sample in samples:
        meta, row = sample["json"], rows[sample["__key__"]]
        assert list(meta) == IMG2DATASET_KEYS + ["uid"]
        assert meta["key"] == meta["uid"] == sample["__key__"]
        assert (meta["url"], meta["caption"], meta["status"], meta["error_message"]) == (
            row["url"], row["caption"], "success", None)
        assert (meta["width"], meta["height"], meta["sha256"]) == (row["width"], row["height"], row["sha256"])
        assert meta["exif"] is None  # pairsift extracts no EXIF (README: img2dataset compatibility)
        assert sample["txt"] == row["caption"]
        assert sample["jpg"].size == (row["width"], row["height"])


def test_each_shard_has_img2datasets_stats_file(run):
    rows = list(catalog(run).values())
    folder = run / "download"
    totals: Counter[str] = Counter()
    for tar in sorted(folder.glob("[0-9]*.tar")):
        stats = json.loads((folder / f"{tar.stem}_stats.json").read_text())
        assert {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
                "end_time", "status_dict"} <= set(stats)
        assert stats["count"] == stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"]
        assert stats["status_dict"].get("success", 0) == stats["successes"]
        assert sum(stats["status_dict"].values()) == stats["count"]
        assert stats["end_time"] >= stats["start_time"] and stats["duration"] >= 0
        totals.update({k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
    assert totals["count"] == len(rows)
    for status in ("failed_to_download", "failed_to_resize"):
        assert totals[status] == sum(r["status"] == status for r in rows)
    assert totals["successes"] == sum(r["status"] == "success" for r in rows)
    # The per-shard parquet img2dataset writes is our part-NNNNN.parquet: no second NNNNN.parquet.
    assert not list(folder.glob("[0-9]*.parquet"))


def test_datacomps_resharder_input_logic_reads_the_folder(run):
    """DataComp's resharder.py (mlfoundations/datacomp): it finds shards ``{:05d}.tar`` counting up
    from 0, takes each one's size from ``sizes.json`` or else ``{:05d}_stats.json``'s
    ``successes``, reads samples with webdataset's tar iterators, parses the json's ``uid`` as a
    128-bit hex number, and logs an error when a shard holds other than its size. Its file is not
    vendored (and needs cloudpathlib and pysimdjson), so this follows those steps on the folder."""
    folder = run / "download"
    sizes, shard = {}, 0
    while (folder / f"{shard:05d}.tar").exists():  # guess_num_shards: contiguous from --first-shard
        stats = folder / f"{shard:05d}_stats.json"
        sizes[f"{shard:05d}.tar"] = int(json.loads(stats.read_text())["successes"])  # load_shard_size
        shard += 1
    assert sizes and not (folder / "sizes.json").exists()  # with no shard table, stats files are all it has
    total = sum(sizes.values())
    uids = []
    for name, size in sizes.items():
        files = tar_file_expander(url_opener([{"url": str(folder / name)}]))
        grouped, current = [], None
        for member in files:  # group_by_keys_nothrow, as the resharder re-implements it
            prefix, suffix = base_plus_ext(member["fname"])
            if current is None or prefix != current["__key__"]:
                if valid_sample(current):
                    grouped.append(current)
                current = {"__key__": prefix}
            current[suffix.lower()] = member["data"]
        if valid_sample(current):
            grouped.append(current)
        assert len(grouped) == size, name  # the resharder's "expected N samples but found M"
        for sample in grouped:
            uid = json.loads(sample["json"])["uid"]
            assert 0 <= int(uid, 16) < 2**128 and len(uid) == 32  # its divmod(int(uid, 16), 2**64)
            uids.append(uid)
    successes = {u for u, r in catalog(run).items() if r["status"] == "success"}
    assert len(uids) == total == len(successes) and set(uids) == successes


def test_retry_failed_rewrites_the_json_and_the_stats_of_the_rows_it_fetched(tmp_path):
    with HostileServer() as server:
        urls = [server.url("/ok.jpg"), server.url("/flaky?key=a&fail=1&code=500"), server.url("/404")]
        cfg = download_run(tmp_path, urls)
        run_pipeline(cfg)
        stats_path = tmp_path / "run/download/00000_stats.json"
        before = json.loads(stats_path.read_text())
        run_pipeline(cfg, retry_reasons=["failed_to_download"])
    after = json.loads(stats_path.read_text())
    assert (before["successes"], before["failed_to_download"]) == (1, 2)
    assert (after["count"], after["successes"], after["failed_to_download"]) == (3, 2, 1)
    samples = {s["__key__"]: s["json"] for s in wds.WebDataset(str(tmp_path / "run/download/00000.tar"),
                                                                shardshuffle=False).decode()}
    assert len(samples) == after["successes"]
    retried = next(meta for meta in samples.values() if "flaky" in meta["url"])
    assert list(retried) == IMG2DATASET_KEYS + ["uid"]
    assert retried["status"] == "success" and retried["width"] == 32
