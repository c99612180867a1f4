"""The report shows what the stage contracts declare, for stages it has never heard of: faces' and
select's score histograms, pii's kinds as concept counts, and a blocklisted row's image nowhere."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairsift.pipeline.config import load_config
from pairsift.pipeline.report import SAMPLES_PER_GROUP, build_context, thumbnail_uri, write_report
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.shard_runner import read_image_tar
from pairsift.pipeline.synth import synthesize

REPO = Path(__file__).resolve().parents[2]
POOL = 160
PII = {0: " mail jane.doe@example.com", 1: " call (415) 555-2671", 2: " at 221 Baker Street"}  # i % 7 -> text
BLOCKED = 5
DOWNLOAD = {"stage": "download", "image_size": 64, "resize_mode": "keep_ratio", "encode_format": "jpg",
            "encode_quality": 90, "timeout_s": 5, "deadline_s": 10, "thread_count": 8, "allow_loopback": True}


def plant_pii(urls: Path) -> None:
    table = pq.read_table(urls)
    captions = [c + PII.get(i % 7, "") for i, c in enumerate(table.column("caption").to_pylist())]
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption", pa.array(captions)), urls)


def run(root: Path, port: int, stages: list[dict]):
    cfg = load_config("demo", {"run_dir": str(root / "run"), "input.path": str(root / "corpus/urls.parquet"),
                               "input.shard_size": 80, "shards.samples_per_shard": 100,
                               "executor.kind": "local", "stages": stages})
    summary = run_pipeline(cfg)
    assert not summary.failed


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("contracts")
    port = free_port()
    synthesize(root / "corpus", n=POOL, seed=9, base_url=f"http://127.0.0.1:{port}", seed_size=0,
               test_per_concept=0)
    plant_pii(root / "corpus/urls.parquet")
    with serve(root / "corpus", port=port):
        run(root, port, [DOWNLOAD])  # first the images, to put some of them on the operator's list
        downloaded: dict[str, bytes] = {}
        for tar in sorted(RunDir(root / "run").stage_dir("download").glob("*.tar")):
            downloaded |= read_image_tar(tar)
        listed = {hashlib.md5(downloaded[uid]).hexdigest() for uid in sorted(downloaded)[:BLOCKED]}
        (root / "md5.txt").write_text("".join(f"{md5}\n" for md5 in sorted(listed)))
        # the synthetic web serves some images under several URLs: every copy is blocked
        blocked = {uid: data for uid, data in downloaded.items() if hashlib.md5(data).hexdigest() in listed}
        run(root, port, [DOWNLOAD,
                         {"stage": "hash_blocklist", "lists": [{"name": "takedowns", "path": str(root / "md5.txt"),
                                                                "kind": "md5"}]},
                         {"stage": "faces"},
                         {"stage": "pii"},
                         {"stage": "select", "score": "length(caption)", "fraction": 0.8}])
    run_dir = root / "run"
    return run_dir, write_report(run_dir), build_context(run_dir), blocked


def view(run_dir: Path, label: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in RunDir(run_dir).parts(label)])


def test_declared_scores_get_histograms_with_their_thresholds(reported):
    run_dir, index, context, _ = reported
    blocks = {(b["label"], b["column"]): b for b in context["scores"]}
    assert set(blocks) == {("faces", "face_count"), ("faces", "face_area"), ("select", "select_score")}
    faces = view(run_dir, "faces")
    for column in ("face_count", "face_area"):
        values = faces.column(column).to_numpy(zero_copy_only=False).astype(float)
        assert blocks["faces", column]["n"] == int(np.isfinite(values).sum()) > 0
        assert blocks["faces", column]["threshold"] is None  # nothing cuts at them
    select = blocks["select", "select_score"]
    threshold = json.loads(RunDir(run_dir).fit("select").read_text())["values"]["threshold"]
    scores = view(run_dir, "select").column("select_score").to_numpy(zero_copy_only=False)
    kept = view(run_dir, "select").column("reason").null_count
    assert select["n"] == len(scores) and select["kept"] == kept and select["rule"] == "top 80% of the pool"
    assert select["threshold"] == f"{threshold:.4f}" and kept == int((scores >= np.float32(threshold)).sum())
    html = index.read_text(encoding="utf-8")
    assert 'id="scores-faces-face_area"' in html and 'id="scores-select-select_score"' in html


def test_declared_concepts_are_counted(reported):
    run_dir, _, context, _ = reported
    (block,) = context["concepts"]
    pii = view(run_dir, "pii")
    expected: dict[str, int] = {}
    for kinds in pii.column("pii").to_pylist():
        for kind in kinds:
            expected[kind] = expected.get(kind, 0) + 1
    assert (block["label"], block["column"], block["t"]) == ("pii", "pii", None)
    assert {r["entry"]: r["before"] for r in block["head"]} == expected
    assert set(expected) == {"email", "phone", "address"}
    # pii only flags: every row it saw is kept
    assert all(r["after"] == r["before"] for r in block["head"])


def test_a_blocklisted_rows_image_never_reaches_the_page(reported):
    run_dir, index, context, blocked = reported
    groups = {g["title"]: g for g in context["samples"]["groups"]}
    group = groups["blocklisted (dropped at hash_blocklist)"]
    assert group["total"] == len(blocked) >= BLOCKED and group["shown"] == min(len(blocked), SAMPLES_PER_GROUP)
    assert {c["uid"] for c in group["cards"]} <= set(blocked)
    assert all(c["src"] is None and c["missing"] == "image withheld (blocklisted)" for c in group["cards"])
    html = index.read_text(encoding="utf-8")
    assert "image withheld (blocklisted)" in html
    for data in blocked.values():  # the thumbnail the report would have drawn of each is nowhere in it
        assert thumbnail_uri(data) not in html
    shown = [c for g in context["samples"]["groups"] if g is not group for c in g["cards"]]
    assert shown and all(c["src"] for c in shown)  # the other groups still show their images


def test_the_report_names_no_stage_column_or_reason():
    sources = " ".join(p.read_text() for p in (REPO / "pipeline").glob("report*.py"))
    for name in ("face_", "select_score", "pii", "blocklist", "clip_score", "matched_entries", "keep_prob",
                 "rewrites", "enriched", "dns_error", '"width"'):
        assert name not in sources, name
