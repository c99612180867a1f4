"""The run report: a real curated run on the synthetic web, its numbers against the catalog, and the
page opened in headless Chromium (every section present, every image loaded, nothing fetched, no
script run from a hostile caption). The screenshot is kept in test-artifacts/report.png."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import tarfile
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from toy_stages import TOY_STAGES

from pairsift.pipeline.catalog import funnel
from pairsift.pipeline.config import load_config, parse_config
from pairsift.pipeline.report import (
    SAMPLES_PER_GROUP,
    build_context,
    read_images,
    write_report,
)
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.shard_runner import read_image_tar
from pairsift.pipeline.synth import synthesize
from pairsift.pipeline.synth_draw import concept_names
from pairsift.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
POOL = 600
# A caption a hostile page could carry: if the report ever inserted it unescaped, the script would
# run (CSP aside) and the markup would break out of the attribute it sits in.
HOSTILE = ' <script>document.title="pwned"</script> "quoted" & <b onmouseover=alert(1)>bold</b>'
SECTIONS = ("funnel", "scores", "concepts", "captions", "samples", "stages", "comparison", "config")
COMPARISON = [
    {"name": "pool", "zero_shot_top1": 16.7, "head_top1": 17.1, "tail_top1": 15.9, "i2t_recall_at_1": 0.061},
    {"name": "curated", "zero_shot_top1": 52.2, "head_top1": 53.0, "tail_top1": 50.4, "i2t_recall_at_1": 0.214},
]


def curation_stages(root: Path) -> list[dict]:
    """The demo's stages plus CLIP-score filtering, balancing and concept-tag enrichment (random tiny CLIP)."""
    names = concept_names(48)
    entries = root / "entries.txt"  # concept names and their words: head entries exist at t = 10
    entries.write_text("\n".join(names + sorted({w for n in names for w in n.split()})) + "\n")
    model = str(REPO / "configs/models/tiny-vit.json")
    return [
        {"stage": "text_filter", "min_chars": 5, "min_words": 2, "languages": ["en"], "dedup": "url"},
        {"stage": "download", "image_size": 64, "resize_mode": "keep_ratio", "encode_format": "jpg",
         "encode_quality": 90, "timeout_s": 5, "deadline_s": 10, "thread_count": 16, "allow_loopback": True},
        {"stage": "image_filter", "min_side": 24, "max_aspect_ratio": 3.0},
        {"stage": "clip_score", "model": model, "batch_size": 128},
        {"stage": "clip_filter", "fraction": 0.7},
        {"stage": "balance", "metadata": str(entries), "t": 10},
        {"stage": "concept_tags", "clip_model": model, "entries": str(entries)},
    ]


def plant_hostile_captions(urls: Path) -> None:
    """Every other row's caption carries the hostile markup (the rows stay English and long enough)."""
    table = pq.read_table(urls)
    captions = table.column("caption").to_pylist()
    planted = [c + HOSTILE if i % 2 == 0 else c for i, c in enumerate(captions)]
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption", pa.array(planted)), urls)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    port = free_port()
    synthesize(root / "corpus", n=POOL, seed=5, base_url=f"http://127.0.0.1:{port}", seed_size=0,
               test_per_concept=0)
    plant_hostile_captions(root / "corpus/urls.parquet")
    run_dir = root / "run"
    with serve(root / "corpus", port=port):
        cfg = load_config("demo", {"run_dir": str(run_dir), "input.path": str(root / "corpus/urls.parquet"),
                                   "input.shard_size": 300, "shards.samples_per_shard": 200,
                                   "executor.kind": "local", "stages": curation_stages(root)})
        summary = run_pipeline(cfg)
    assert not summary.failed
    (run_dir / "report").mkdir(exist_ok=True)
    (run_dir / "report/comparison.json").write_text(json.dumps(COMPARISON))
    return run_dir, write_report(run_dir), build_context(run_dir)


class PageParts(HTMLParser):
    """Section ids, every src/href, every <img>, and whether any <script> element exists."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.links: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "section" and attributes.get("id"):
            self.sections.append(attributes["id"])
        if tag == "img":
            self.images.append(attributes)
        if tag == "script":
            self.scripts += 1
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def parse(index: Path) -> PageParts:
    parts = PageParts()
    parts.feed(index.read_text(encoding="utf-8"))
    return parts


# --- without a browser ---------------------------------------------------------------------------

def test_page_is_self_contained_and_escapes_captions(reported):
    run_dir, index, context = reported
    html = index.read_text(encoding="utf-8")
    page = parse(index)
    assert index == run_dir / "report/index.html"
    assert page.sections == list(SECTIONS)
    # nothing outside the file: images are data URIs, links are in-page anchors
    assert page.images and all(str(img["src"]).startswith("data:image/") for img in page.images)
    assert all(link.startswith(("data:", "#")) for link in page.links), [x for x in page.links if x[:5] != "data:"]
    assert not re.search(r"https?://", " ".join(page.links))
    assert "default-src 'none'" in html  # the CSP that forbids fetches and scripts
    # the hostile caption is shown as text, never as markup
    assert page.scripts == 0 and "<b onmouseover" not in html
    assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in html
    visible = "".join(page.text)
    assert '<script>document.title="pwned"</script>' in visible
    titles = [img.get("alt") or "" for img in page.images]
    assert any('"quoted" & <b onmouseover=alert(1)>' in t for t in titles)  # attribute value stayed intact


def test_numbers_match_the_catalog(reported):
    run_dir, _, context = reported
    run = RunDir(run_dir)

    # funnel: the same counts as the catalog's funnel, stage by stage
    expected = {s.label: (s.rows_in, s.kept, s.dropped) for s in funnel(run_dir)}
    shown = {r["label"]: (r["rows_in"], r["kept"], {x: n for x, n, _ in r["dropped"]}) for r in context["funnel"]["rows"]}
    assert shown == expected and expected["ingest"][0] == POOL

    # CLIP score: the threshold the filter fitted; kept = rows at or above it
    (clip,) = context["scores"]
    threshold = json.loads(run.fit("clip_filter").read_text())["values"]["threshold"]
    scores = pa.concat_tables([pq.read_table(p) for p in run.parts("clip_score")])
    values = scores.column("clip_score").to_numpy()
    assert (clip["label"], clip["column"], clip["filter"]) == ("clip_score", "clip_score", "clip_filter")
    assert clip["threshold"] == f"{threshold:.4f}" and clip["n"] == len(values) and clip["rule"] == "top 70% of the pool"
    assert clip["kept"] == int((values.astype(np.float32) >= np.float32(threshold)).sum())

    # balancing: before/after entry counts recomputed here from the balance parts with numpy
    (block,) = context["concepts"]
    parts = pa.concat_tables([pq.read_table(p) for p in run.parts("balance")])
    matched = pc.list_flatten(parts.column("matched_entries")).to_numpy()
    kept_rows = pc.is_null(parts.column("reason"))
    kept_matched = pc.list_flatten(parts.column("matched_entries").filter(kept_rows)).to_numpy()
    before = np.bincount(matched)
    after = np.bincount(kept_matched, minlength=len(before))
    head = before > 10
    assert block["t"] == 10 and block["n_head"] == int(head.sum()) > 0 and block["total"] == len(matched)
    assert block["head_share_before"] == f"{100 * before[head].sum() / before.sum():.1f}%"
    assert block["head_share_after"] == f"{100 * after[head].sum() / after.sum():.1f}%"
    entries = pq.read_table(run.fit_table("balance", "counts")).column("entry").to_pylist()
    top = np.lexsort((np.arange(len(before)), -before))[: len(block["head"])]  # ties by entry id
    assert [(r["entry"], r["before"], r["after"]) for r in block["head"]] == [
        (entries[i], int(before[i]), int(after[i])) for i in top
    ]

    # captions: every enriched caption counted, originals of the same rows before
    (captions,) = context["captions"]
    enriched = pa.concat_tables([pq.read_table(p) for p in run.parts("concept_tags")])
    n_enriched = enriched.num_rows - enriched.column("enriched_caption").null_count
    assert captions["kind"] == "enriched caption" and captions["n_before"] == captions["n_after"] == n_enriched
    assert len(captions["examples"]) == 6 and all(". tags: " in ex["new"][0] for ex in captions["examples"])


def test_sample_grid_shows_only_rows_with_images(reported):
    run_dir, index, context = reported
    run = RunDir(run_dir)
    samples = context["samples"]
    assert samples["image_label"] == "download"
    downloaded: dict[str, bytes] = {}
    for tar in sorted(run.stage_dir("download").glob("*.tar")):
        downloaded |= read_image_tar(tar)
    reasons = {}
    for label in ("image_filter", "clip_filter", "balance"):
        for part in run.parts(label):
            for uid, reason in zip(*pq.read_table(part, columns=["uid", "reason"]).to_pydict().values()):
                if reason is not None:
                    reasons[uid] = (label, reason)
    kept = {uid for p in run.shards.tables() for uid in pq.read_table(p).column("uid").to_pylist()}
    groups = {g["title"]: g for g in samples["groups"]}
    assert list(groups)[0] == "kept" and groups["kept"]["total"] == len(kept)
    # one group per (stage, reason) of rows dropped after download, with the catalog's counts
    expected = {}
    for label, reason in reasons.values():
        expected[f"{reason} (dropped at {label})"] = expected.get(f"{reason} (dropped at {label})", 0) + 1
    assert {t: g["total"] for t, g in groups.items() if t != "kept"} == expected
    assert not any("dropped at text_filter" in t or "dropped at download" in t for t in groups)
    for title, group in groups.items():
        assert group["shown"] == min(SAMPLES_PER_GROUP, group["total"])
        for card in group["cards"]:
            assert (card["uid"] in kept) if title == "kept" else title.startswith(reasons[card["uid"]][1])
            # the thumbnail is the downloaded image of that very uid, scaled to fit 160 px
            thumb = Image.open(io.BytesIO(base64.b64decode(card["src"].split(",", 1)[1])))
            original = Image.open(io.BytesIO(downloaded[card["uid"]]))
            assert thumb.size == original.size or max(thumb.size) == 160
            assert np.abs(np.asarray(thumb.convert("RGB").resize(original.size), float)
                          - np.asarray(original.convert("RGB"), float)).mean() < 12
    # the same picks on every report (the smallest hashes of uid, not a random draw): the page written
    # by write_report and the context built again afterwards show the same thumbnails in the same order
    written = [img["src"] for img in parse(index).images if img.get("class") == "sample"]
    assert written == [card["src"] for group in samples["groups"] for card in group["cards"]]


def test_stages_and_comparison_sections(reported):
    run_dir, _, context = reported
    stages = {r["label"]: r for r in context["stages"]["rows"]}
    runs = {r["label"]: r for r in json.loads((run_dir / "run.json").read_text())["stage_runs"]}
    assert list(stages) == ["text_filter", "download", "image_filter", "clip_score", "clip_filter", "balance",
                            "concept_tags", "shards"]
    for label, row in stages.items():
        assert row["rows"] == runs[label]["rows"] and row["shards_done"] == runs[label]["shards_done"]
    assert stages["clip_score"]["kind"] == "actor pool" and stages["clip_score"]["resources"] == "1 CPU"
    assert stages["balance"]["kind"] == "pool fit + actor pool"
    assert stages["text_filter"]["kind"] == "tasks"
    assert context["stages"]["failed"] == []
    errors = {e: n for label, e, n in context["stages"]["row_errors"] if label == "download"}
    failed_download = funnel(run_dir)[2].dropped.get("failed_to_download", 0)
    assert errors.get("HTTP 404 File not found") == failed_download > 0
    comparison = context["comparison"]
    assert comparison["columns"] == ["name", "zero_shot_top1", "head_top1", "tail_top1", "i2t_recall_at_1"]
    assert comparison["rows"] == [["pool", "16.7", "17.1", "15.9", "0.061"],
                                  ["curated", "52.2", "53.0", "50.4", "0.214"]]  # decimals per column


def test_failed_shards_are_listed_and_absent_sections_left_out(tmp_path, monkeypatch):
    """A text-only run (no images, no scores) with a poisoned shard: no empty sections, the error shown."""
    for name, path in TOY_STAGES.items():
        monkeypatch.setitem(STAGES, name, path)
    rows = [{"url": f"http://127.0.0.1:1/{i}.jpg", "caption": "word " * (i % 7)} for i in range(200)]
    rows[150]["caption"] = "poison"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "input": {"path": str(tmp_path / "pool.parquet"),
                                                                    "shard_size": 64},
                        "executor": {"kind": "local", "max_retries": 0},
                        "stages": [{"stage": "caption_length", "min_chars": 12, "fail_on_shard_with": "poison"}]})
    summary = run_pipeline(cfg)
    assert list(summary.failed["caption_length"]) == [2]
    (tmp_path / "run/report").mkdir()
    (tmp_path / "run/report/comparison.json").write_text("{not json")
    index = write_report(tmp_path / "run")
    page = parse(index)
    assert page.sections == ["funnel", "stages", "comparison", "config"]
    context = build_context(tmp_path / "run")
    (failed,) = context["stages"]["failed"]
    assert failed["label"] == "caption_length" and failed["shard"] == 2 and failed["attempts"] == 1
    assert "poisoned shard" in failed["error"]
    assert "poisoned shard" in index.read_text()
    assert context["comparison"]["error"].startswith("comparison.json is unreadable")
    funnel_rows = {r["label"]: r for r in context["funnel"]["rows"]}
    assert funnel_rows["caption_length"]["shards"] == "1 failed"
    assert funnel_rows["caption_length"]["rows_in"] == 200 - 64  # shard 2 (rows 128..191) never landed


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_thumbnail_reader_takes_only_wanted_images(tmp_path, tar_format):
    """The fast ustar scan and its tarfile fallback (long names need GNU or pax headers) read the same."""
    long_key = "k" * 120 if tar_format != tarfile.USTAR_FORMAT else "k" * 40
    members = {"a.jpg": b"A" * 700, "a.txt": b"caption a", "b.png": b"B" * 10, "c.webp": b"C" * 512,
               f"{long_key}.jpg": b"L" * 1025, "d.json": b"{}"}
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    wanted = {"a", "c", long_key, "missing"}
    expected = {"a": b"A" * 700, "c": b"C" * 512, long_key: b"L" * 1025}
    assert read_images(path, wanted) == expected
    assert read_images(tmp_path / "absent.tar", {"a"}) == {}


# --- in the browser ------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: JSON messages ending in NUL on
    fds 3 (to the browser) and 4 (from it). No port is opened, so nothing else can connect."""

    def __init__(self, binary: str, profile: Path):
        # Our pipe ends live at fds >= 10, so bash's "3<&N 4>&M" cannot clobber one with the other
        # (dash takes only fds 0-9 in redirections, hence bash).
        to_browser, self._to_browser = (self._high(fd) for fd in os.pipe())
        self._from_browser, from_browser = (self._high(fd) for fd in os.pipe())
        wire = f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", wire, "bash", binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    @staticmethod
    def _high(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return moved

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


PAGE_FACTS = """JSON.stringify({
  title: document.title,
  sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),
  headings: Array.from(document.querySelectorAll('section[id] > h2')).map(h => h.textContent),
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
                                                  h: i.naturalHeight, shownWidth: i.clientWidth})),
  captions: Array.from(document.querySelectorAll('figcaption')).map(f => f.textContent),
  violations: window.__violations || [],
  height: document.documentElement.scrollHeight,
})"""


def inspect_page(index: Path, screenshot: Path) -> dict:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(binary, Path(profile))
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Network", "Runtime"):
                browser.send(f"{domain}.enable", session=session)
            browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": (
                "window.__violations = []; document.addEventListener('securitypolicyviolation', "
                "e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));")}, session=session)
            browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 1000,
                                                                "deviceScaleFactor": 1, "mobile": False},
                         session=session)
            browser.send("Page.navigate", {"url": index.resolve().as_uri()}, session=session)
            browser.wait_for("Page.loadEventFired")
            facts = json.loads(browser.send("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True},
                                            session=session)["result"]["value"])
            browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": facts["height"],
                                                                "deviceScaleFactor": 1, "mobile": False},
                         session=session)
            shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                session=session)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            facts["requests"] = [e["params"]["request"]["url"] for e in browser.events
                                 if e.get("method") == "Network.requestWillBeSent"]
        finally:
            browser.close()
    return facts


def test_report_in_headless_chromium(reported):
    run_dir, index, context = reported
    facts = inspect_page(index, ARTIFACTS / "report.png")
    assert facts["sections"] == list(SECTIONS)
    assert all(h.strip() for h in facts["headings"]) and len(facts["headings"]) == len(SECTIONS)
    # every image decoded: 5 charts (funnel, CLIP score, concepts, captions, stage times) and the thumbnails
    expected_images = len(parse(index).images)
    thumbnails = sum(g["shown"] for g in context["samples"]["groups"])
    assert len(facts["images"]) == expected_images == 5 + thumbnails
    broken = [img["alt"] for img in facts["images"] if not (img["complete"] and img["w"] > 0 and img["h"] > 0)]
    assert not broken
    assert all(img["shownWidth"] > 0 for img in facts["images"])
    # nothing was fetched but the file itself and its data URIs; no CSP violation, the hostile script never ran
    assert facts["requests"] and all(url.startswith(("file://", "data:")) for url in facts["requests"])
    assert facts["violations"] == []
    assert facts["title"].startswith("pairsift report") and "pwned" not in facts["title"]
    assert any('<script>document.title="pwned"</script>' in c for c in facts["captions"])
    shot = Image.open(ARTIFACTS / "report.png")
    assert shot.width == 1280 and shot.height == facts["height"] > 3000
