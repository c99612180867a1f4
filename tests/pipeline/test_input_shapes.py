"""Metadata shaped like LAION, DataComp and COYO (their column names, including ones pairsift also
writes) run through ingest and a download from the synthetic web on 127.0.0.1: every row survives
ingest, the catalog's own columns hold pairsift's measured values, every input column is kept as
``source_<name>``, and the final shards' json says the same."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pairsift.pipeline.catalog import query
from pairsift.pipeline.config import CONFIGS_DIR, parse_config
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.synth import synthesize
from pairsift.stages.ingest import uid_of

POOL = 120
FAKE = 99_999  # a size no synthetic image has: an input value must never pass for a measured one


def laion(urls: list[str], captions: list[str]) -> tuple[pa.Table, str, str]:
    n = len(urls)
    return pa.table({"URL": urls, "TEXT": captions, "WIDTH": [FAKE] * n, "HEIGHT": [FAKE] * n,
                     "similarity": [0.3] * n, "hash": list(range(n)), "punsafe": [0.01] * n,
                     "pwatermark": [0.2] * n}), "URL", "TEXT"


def datacomp(urls: list[str], captions: list[str]) -> tuple[pa.Table, str, str]:
    n = len(urls)
    return pa.table({"uid": [f"{i:032x}" for i in range(n)], "url": urls, "text": captions,
                     "original_width": [FAKE] * n, "original_height": [FAKE] * n,
                     "sha256": ["0" * 64] * n}), "url", "text"


def coyo(urls: list[str], captions: list[str]) -> tuple[pa.Table, str, str]:
    n = len(urls)
    return pa.table({"id": list(range(n)), "url": urls, "text": captions, "width": [FAKE] * n,
                     "height": [FAKE] * n, "image_phash": ["ffff"] * n, "clip_similarity_vitb32": [0.3] * n,
                     "nsfw_score_opennsfw2": [0.0] * n}), "url", "text"


def with_reason(urls: list[str], captions: list[str]) -> tuple[pa.Table, str, str]:
    return pa.table({"url": urls, "caption": captions, "reason": ["input said so"] * len(urls),
                     "status": ["success"] * len(urls)}), "url", "caption"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    port = free_port()
    synthesize(root / "corpus", n=POOL, seed=5, base_url=f"http://127.0.0.1:{port}", seed_size=8,
               test_per_concept=1, n_concepts=4)
    with serve(root / "corpus", port=port):
        yield root


def run_shape(root, name, shape):
    pool = pq.read_table(root / "corpus/urls.parquet")
    table, url_col, caption_col = shape(pool.column("url").to_pylist(), pool.column("caption").to_pylist())
    pq.write_table(table, root / f"{name}.parquet")
    data = yaml.safe_load((CONFIGS_DIR / "demo.yaml").read_text())
    data["stages"] = [s for s in data["stages"] if s["stage"] in ("text_filter", "download")]
    next(s for s in data["stages"] if s["stage"] == "download")["allow_loopback"] = True  # as `demo` sets it
    data.update(run_dir=str(root / name), shards={"samples_per_shard": 50}, executor={"kind": "local"})
    data["input"] = {"path": str(root / f"{name}.parquet"), "url_col": url_col, "caption_col": caption_col,
                     "shard_size": 40}
    summary = run_pipeline(parse_config(data))
    assert not summary.failed
    return table, url_col, caption_col


@pytest.mark.parametrize("name, shape", [("laion", laion), ("datacomp", datacomp), ("coyo", coyo),
                                         ("reason", with_reason)])
def test_input_columns_never_collide_with_pairsift_columns(web, name, shape):
    table, url_col, caption_col = run_shape(web, name, shape)
    extras = [n for n in table.column_names if n not in (url_col, caption_col)]
    columns, rows = query(web / name, "SELECT * FROM samples ORDER BY uid")
    samples = [dict(zip(columns, row)) for row in rows]
    assert len(samples) == POOL  # every input row survives ingest, an input 'reason' included

    run = RunDir(web / name)
    n_shards = json.loads((run.stage_dir("ingest") / "_manifest.json").read_text())["n_shards"]
    uids = pa.concat_tables([pq.read_table(run.part("ingest", s), columns=["uid"]) for s in range(n_shards)])
    by_uid = {s["uid"]: s for s in samples}
    for source, uid in zip(table.to_pylist(), uids.column("uid").to_pylist()):  # ingest keeps input order
        sample = by_uid[uid]
        assert (sample["url"], sample["caption"]) == (source[url_col], source[caption_col])
        assert all(sample[f"source_{n}"] == source[n] for n in extras)  # every input column, prefixed
        assert uid in {uid_of(source[url_col], source[caption_col], k) for k in range(POOL)}

    truth = {r["url"]: r for r in pq.read_table(web / "corpus/ground_truth.parquet").to_pylist()}
    downloaded = [s for s in samples if s["download_reason"] is None and s["text_filter_reason"] is None]
    assert len(downloaded) > POOL // 3
    for sample in downloaded:  # pairsift's measured values, not the input's
        assert sample["original_width"] == truth[sample["url"]]["width"] != FAKE
        assert min(sample["width"], sample["height"]) <= 64 < FAKE  # keep_ratio: the short side is 64
        assert len(sample["sha256"]) == 64 and sample["sha256"] != "0" * 64
        assert sample["reason"] is None
    dropped = [s for s in samples if s["reason"] is not None]
    assert all(s["reason"] != "input said so" for s in dropped)

    # the final shards' json: pairsift's uid and sizes, the input's columns under their prefix
    kept = {s["uid"]: s for s in downloaded}
    metas = []
    for shard in sorted(run.shards_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    assert len(metas) == len(kept)
    for meta in metas:
        assert meta["original_width"] == kept[meta["uid"]]["original_width"]
        assert all(f"source_{n}" in meta for n in extras)
