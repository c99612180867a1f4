"""End to end: a synthetic web served on 127.0.0.1, the demo config on Ray, checked against ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pairsift.pipeline.catalog import funnel, query
from pairsift.pipeline.config import CONFIGS_DIR, parse_config
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.synth import synthesize
from pairsift.pipeline.verify import verify_run

REPO = Path(__file__).resolve().parents[2]
POOL = 1_500


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    synthesize(root / "corpus", n=POOL, seed=3, base_url=f"http://127.0.0.1:{port}")
    with serve(root / "corpus", port=port):
        cfg = spine_config(root)
        summary = run_pipeline(cfg)
    return root, cfg, summary


def spine_config(root: Path):
    """The demo preset's spine: its text filter, download and image filter (the CLIP and balancing
    stages it adds need a trained filter network; the demo test covers them)."""
    data = yaml.safe_load((CONFIGS_DIR / "demo.yaml").read_text())
    data["stages"] = [s for s in data["stages"] if s["stage"] in ("text_filter", "download", "image_filter")]
    next(s for s in data["stages"] if s["stage"] == "download")["allow_loopback"] = True  # as `demo` sets it
    data.update(run_dir=str(root / "run"), shards={"samples_per_shard": 300})
    data["input"].update(path=str(root / "corpus/urls.parquet"), shard_size=400)
    return parse_config(data)


def outcomes(root: Path) -> list[dict]:
    """Ground truth row by row, with where and why the pipeline dropped it (None = kept)."""
    run = RunDir(root / "run")
    n = json.loads((run.stage_dir("ingest") / "_manifest.json").read_text())["n_shards"]
    uids = pa.concat_tables([pq.read_table(run.part("ingest", s), columns=["uid"]) for s in range(n)])
    _, rows = query(root / "run", "SELECT uid, dropped_at, reason FROM samples")
    where = {uid: (stage, reason) for uid, stage, reason in rows}
    truth = pq.read_table(root / "corpus/ground_truth.parquet").sort_by("row").to_pylist()
    for row, uid in zip(truth, uids.column("uid").to_pylist()):
        row["dropped_at"], row["reason"] = where[uid]
    return truth


def test_funnel_matches_the_ground_truth(curated):
    root, _, summary = curated
    assert not summary.failed
    rows = outcomes(root)
    assert len(rows) == POOL
    by_defect: dict[str, list[dict]] = {}
    for row in rows:
        by_defect.setdefault(row["defect"], []).append(row)

    # every duplicate is dropped once, by the text filter, as a duplicate
    for row in by_defect["duplicate_exact"] + by_defect["duplicate_url"]:
        assert (row["dropped_at"], row["reason"]) == ("text_filter", "duplicate")
    # every dead link that reached download failed to download; corrupt files fail to decode
    dead = [r for r in by_defect["dead_link"] if r["dropped_at"] != "text_filter"]
    assert dead and all(r["reason"] == "failed_to_download" for r in dead)
    corrupt = [r for r in by_defect["corrupt"] if r["dropped_at"] != "text_filter"]
    assert all(r["dropped_at"] == "download" and r["reason"] in ("decode_error", "not_an_image") for r in corrupt)
    # every tiny or extremely elongated image that downloaded is dropped by the image filter
    # (a 160x20 banner is both too small and too elongated: the first failing check names it)
    for defect, reasons in (("tiny", {"image_too_small"}), ("extreme_aspect", {"extreme_aspect_ratio", "image_too_small"})):
        reached = [r for r in by_defect[defect] if r["dropped_at"] != "text_filter"]
        assert reached and all(r["dropped_at"] == "image_filter" and r["reason"] in reasons for r in reached)
    # caption rules catch boilerplate and other languages; clean rows survive
    assert all(r["dropped_at"] == "text_filter" for r in by_defect["boilerplate"])
    non_english = by_defect["non_english"]
    assert sum(r["reason"] == "language" for r in non_english) >= 0.8 * len(non_english)
    clean = by_defect["none"]
    assert sum(r["dropped_at"] is None for r in clean) >= 0.9 * len(clean)
    # nothing is lost: every stage's rows in = kept + dropped, and the run verifies from disk
    assert all(stage.balanced for stage in funnel(root / "run"))
    assert verify_run(root / "run").ok


def test_shards_hold_exactly_the_kept_samples(curated):
    root, _, summary = curated
    shards = root / "run" / "shards"
    sizes = json.loads((shards / "_meta/sizes.json").read_text())
    _, kept = query(root / "run", "SELECT uid, caption FROM samples WHERE reason IS NULL")
    assert sum(sizes.values()) == len(kept) == summary.samples_written
    assert max(sizes.values()) == 300
    members = Counter()
    with tarfile.open(shards / "00000.tar") as tar:
        names = tar.getnames()
        first_json = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    members.update(n.rsplit(".", 1)[1] for n in names)
    assert members["jpg"] == members["txt"] == members["json"] == sizes["00000.tar"]
    assert {"uid", "url", "caption", "width", "height"} <= set(first_json)
    assert dict(kept)[first_json["uid"]] == first_json["caption"]
    # the shard's parquet has exactly the tar's samples, in order, with the same captions
    with tarfile.open(shards / "00000.tar") as tar:
        txt = {n[:-4]: tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".txt")}
    table = pq.read_table(shards / "_meta/00000.parquet")
    assert table.column("uid").to_pylist() == list(txt)
    assert table.column("caption").to_pylist() == list(txt.values())


def test_cli_status_query_and_plan(curated):
    root, _, _ = curated
    cli = [sys.executable, "-m", "pairsift.pipeline"]
    status = subprocess.run(cli + ["status", str(root / "run")], capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0 and "failed_to_download" in status.stdout and "image_filter" in status.stdout
    result = subprocess.run(cli + ["query", str(root / "run"), "SELECT count(*) AS n FROM samples"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and str(POOL) in result.stdout
    bad = subprocess.run(cli + ["query", str(root / "run"), "SELECT nope FROM samples"], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: query failed")
    verify = subprocess.run(cli + ["verify", str(root / "run")], capture_output=True, text=True, cwd=REPO)
    assert verify.returncode == 0 and verify.stdout.startswith("ok")
