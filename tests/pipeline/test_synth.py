"""The synthetic web: its ground truth must be true of the files, and the server must serve them."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from pairsift.pipeline.errors import UserError
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.synth import DefectMix, SynthSummary, synthesize
from pairsift.pipeline.synth_draw import _shape_polygon, concept_names

N = 2000
CONTENT_TYPE = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# CSS colour prototypes, independent of the synthesiser's palette: the drawn colour must be nearest
# to the CSS colour its name says.
CSS = {
    "red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "purple": (128, 0, 128), "orange": (255, 165, 0), "pink": (255, 192, 203), "brown": (139, 69, 19),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary, int]:
    out = tmp_path_factory.mktemp("synth")
    port = free_port()
    summary = synthesize(out, N, seed=3, base_url=f"http://127.0.0.1:{port}", seed_size=300,
                         test_per_concept=6, workers=2)
    return out, summary, port


@pytest.fixture(scope="module")
def truth(corpus: tuple[Path, SynthSummary, int]) -> list[dict[str, Any]]:
    return pq.read_table(corpus[0] / "ground_truth.parquet").to_pylist()


def _local_file(out: Path, url: str) -> Path:
    return out / "web" / url.split("/", 3)[3]


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_urls_parquet_is_only_url_and_caption(corpus: tuple[Path, SynthSummary, int], truth: list) -> None:
    urls = pq.read_table(corpus[0] / "urls.parquet")
    assert urls.column_names == ["url", "caption"]
    assert urls.num_rows == N
    assert urls.to_pylist() == [{"url": r["url"], "caption": r["caption"]} for r in truth]
    assert [r["row"] for r in truth] == list(range(N))


def test_defect_fractions_match_the_mix(truth: list) -> None:
    counts = Counter(r["defect"] for r in truth)
    mix = DefectMix()
    expected = {k: v for k, v in mix.model_dump().items() if k != "duplicates"}
    for defect, fraction in expected.items():
        assert abs(counts[defect] / N - fraction) <= 0.005, (defect, counts[defect])
    dups = counts["duplicate_exact"] + counts["duplicate_url"]
    assert abs(dups / N - mix.duplicates) <= 0.005
    assert abs(counts["duplicate_exact"] - counts["duplicate_url"]) <= 1
    assert abs(counts["none"] / N - (1 - sum(mix.model_dump().values()))) <= 0.01


def test_captions_say_what_the_defect_says(truth: list) -> None:
    names = set(concept_names(48))
    for r in truth:
        caption, defect = r["caption"].lower(), r["defect"]
        named = {c for c in names if c in caption}
        if defect in ("none", "tiny", "extreme_aspect"):
            assert r["caption_concept"] == r["concept"] and r["concept"] in caption, r
        elif defect == "mismatched":
            assert r["caption_concept"] != r["concept"] and r["caption_concept"] in caption, r
            assert r["concept"] not in named, r
        elif defect in ("boilerplate", "non_english"):
            assert not named, r  # neither names a concept in English
            assert (r["caption_concept"] is None) == (defect == "boilerplate")
        elif defect in ("corrupt", "dead_link"):
            assert r["concept"] is None and r["caption_concept"] in caption
    foreign = [r["caption"] for r in truth if r["defect"] == "non_english"]
    assert len(set(foreign)) > len(foreign) // 2  # varied, not one template


def test_duplicates_repeat_an_earlier_row(truth: list) -> None:
    first_url: dict[str, int] = {}
    for r in truth:
        if r["defect"].startswith("duplicate"):
            src = truth[r["source_row"]]
            assert src["row"] < r["row"] and src["url"] == r["url"]
            assert (src["caption"] == r["caption"]) == (r["defect"] == "duplicate_exact")
            assert r["concept"] == src["concept"] is not None
        else:
            assert r["url"] not in first_url, "only duplicate rows reuse a url"
            first_url[r["url"]] = r["row"]


def test_concepts_are_long_tailed(corpus: tuple[Path, SynthSummary, int], truth: list) -> None:
    counts = Counter(r["concept"] for r in truth if r["concept"] and not r["defect"].startswith("dup"))
    ranked = [counts.get(c, 0) for c in corpus[1].zipf_order]
    assert ranked[0] == max(ranked)
    assert ranked[0] >= 15 * np.mean(ranked[-5:])
    assert np.mean(ranked[:5]) > 5 * np.mean(ranked[20:25]) > 0
    # The seed set follows the same law: its commonest concept is the pool's commonest.
    seed_counts = Counter(m["concept"] for m in _read_set(corpus[0] / "seed"))
    assert seed_counts.most_common(1)[0][0] == corpus[1].zipf_order[0]


def _read_set(directory: Path) -> list[dict[str, Any]]:
    """Every sample of a webdataset folder, checking that each key has its jpg, txt and json."""
    samples = []
    sizes = json.loads((directory / "sizes.json").read_text())
    for name, size in sizes.items():
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(directory / name) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
        assert len(members) == size
        for parts in members.values():
            meta = json.loads(parts["json"])
            assert parts["txt"].decode() == meta["caption"]
            assert _decode(parts["jpg"]).format == "JPEG"
            samples.append(meta)
    return samples


def test_clean_sets(corpus: tuple[Path, SynthSummary, int]) -> None:
    out = corpus[0]
    classnames = json.loads((out / "test" / "classnames.json").read_text())
    assert classnames == concept_names(48) and len(set(classnames)) == 48
    templates = json.loads((out / "test" / "templates.json").read_text())
    assert templates and all("{}" in t for t in templates)
    test = _read_set(out / "test")
    assert Counter(m["label"] for m in test) == {label: 6 for label in range(48)}
    seed = _read_set(out / "seed")
    assert len(seed) == 300
    for m in test + seed:
        assert classnames[m["label"]] == m["concept"] and m["concept"] in m["caption"].lower()


def test_every_url_is_served_as_the_truth_says(corpus: tuple[Path, SynthSummary, int], truth: list) -> None:
    out, _, port = corpus

    def fetch(url: str) -> tuple[int, str, bytes]:
        # http.client straight to the loopback port: no proxy settings can send this elsewhere.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/" + url.split("/", 3)[3])
        resp = conn.getresponse()
        result = resp.status, resp.getheader("Content-Type", ""), resp.read()
        conn.close()
        return result

    with serve(out, port=port) as server, ThreadPoolExecutor(8) as pool:
        assert server.url == f"http://127.0.0.1:{port}"
        responses = list(pool.map(fetch, [r["url"] for r in truth]))
    seen = Counter()
    for r, (status, ctype, body) in zip(truth, responses, strict=True):
        if r["defect"] == "dead_link":
            assert status == 404, r
            continue
        assert status == 200 and ctype == CONTENT_TYPE[r["format"]], (r, status, ctype)
        if r["defect"] == "corrupt":
            with pytest.raises((OSError, SyntaxError, ValueError)):
                _decode(body)
        else:
            img = _decode(body)
            assert img.format.lower() == r["format"] and img.size == (r["width"], r["height"]), r
        seen[r["defect"]] += 1
    assert seen["corrupt"] > 0 and seen["none"] > 0


def test_image_defects_are_real(truth: list) -> None:
    sizes = {d: [(r["width"], r["height"]) for r in truth if r["defect"] == d] for d in
             ("none", "tiny", "extreme_aspect")}
    assert all(max(w, h) <= 16 for w, h in sizes["tiny"])
    assert all(max(w, h) / min(w, h) >= 6 for w, h in sizes["extreme_aspect"])
    normal = sizes["none"]
    assert all(max(w, h) / min(w, h) < 2 and min(w, h) >= 32 for w, h in normal)
    assert np.mean([48 <= w <= 128 and 48 <= h <= 128 for w, h in normal]) >= 0.8
    formats = Counter(r["format"] for r in truth if r["defect"] == "none")
    total = sum(formats.values())
    assert abs(formats["jpeg"] / total - 0.7) < 0.05 and abs(formats["png"] / total - 0.2) < 0.05


def _shape_templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in ("circle", "square", "triangle", "star", "cross", "diamond"):
        img = Image.new("L", (96, 96))
        ImageDraw.Draw(img).polygon([(48 + x, 48 + y) for x, y in _shape_polygon(shape, 40)], fill=255)
        out[shape] = _normalised_mask(np.asarray(img) > 0)
    return out


def _normalised_mask(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((32, 32), Image.BILINEAR)) > 127


def test_drawn_concepts_are_what_the_truth_says(corpus: tuple[Path, SynthSummary, int], truth: list) -> None:
    """Without any model: the centre colour names the colour, the object's outline names the shape."""
    templates = _shape_templates()
    colour_ok = shape_ok = 0
    clean = [r for r in truth if r["defect"] == "none"]
    for r in clean:
        arr = np.asarray(Image.open(_local_file(corpus[0], r["url"])).convert("RGB"), dtype=np.float32)
        h, w, _ = arr.shape
        s = max(1, round(0.05 * min(h, w)))
        centre = arr[h // 2 - s : h // 2 + s + 1, w // 2 - s : w // 2 + s + 1].reshape(-1, 3).mean(0)
        colour, shape = r["concept"].split(" ")
        colour_ok += min(CSS, key=lambda c: np.linalg.norm(centre - np.array(CSS[c]))) == colour
        mask = _normalised_mask(np.linalg.norm(arr - centre, axis=2) < 45)
        iou = {k: (t & mask).sum() / (t | mask).sum() for k, t in templates.items()}
        shape_ok += max(iou, key=iou.get) == shape  # type: ignore[arg-type]
    assert len(clean) > 500
    assert colour_ok / len(clean) >= 0.95
    assert shape_ok / len(clean) >= 0.90


def _digest(out: Path) -> dict[str, str]:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "summary.json")
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", 400, seed=11, seed_size=40, test_per_concept=1, workers=2)
    b = synthesize(tmp_path / "b", 400, seed=11, seed_size=40, test_per_concept=1, workers=1)
    c = synthesize(tmp_path / "c", 400, seed=12, seed_size=0, test_per_concept=0, workers=1)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db and len(da) > 350
    assert da["urls.parquet"] != dc["urls.parquet"]
    assert a.model_dump(exclude={"out_dir", "seconds"}) == b.model_dump(exclude={"out_dir", "seconds"})
    assert c.defect_counts == a.defect_counts


def test_custom_mix_and_grid(tmp_path: Path) -> None:
    mix = DefectMix(mismatched=0, boilerplate=0, non_english=0, duplicates=0, tiny=0, extreme_aspect=0,
                    corrupt=0, dead_link=0.5)
    s = synthesize(tmp_path / "x", 200, seed=1, mix=mix, n_concepts=100, seed_size=0, test_per_concept=0,
                   workers=1)
    assert s.defect_counts == {"none": 100, "dead_link": 100}
    names = concept_names(100)
    assert len(set(names)) == 100 and s.concepts == names
    assert len({n.split()[0] for n in names}) > 8 and len({n.split()[1] for n in names}) > 6
    with pytest.raises(UserError):
        concept_names(10_000)
    with pytest.raises(ValidationError):
        DefectMix(mismatched=0.9, boilerplate=0.2)
    with pytest.raises(UserError, match="already holds"):
        synthesize(tmp_path / "x", 10, workers=1)


def test_server_serves_only_web_and_only_on_loopback(corpus: tuple[Path, SynthSummary, int]) -> None:
    out = corpus[0]
    for host in ("0.0.0.0", "10.1.2.3", "example.com", "::"):
        with pytest.raises(ValueError, match="loopback"):
            serve(out, host=host)
        with pytest.raises(ValueError, match="loopback"):
            free_port(host)
    with serve(out, host="127.0.0.3") as server:
        assert server.url.startswith("http://127.0.0.3:")
        conn = http.client.HTTPConnection("127.0.0.3", server.port, timeout=5)
        for path in ("/urls.parquet", "/../urls.parquet", "/img/", "/img", "/nope.jpg"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404, path
            conn.close()
    with pytest.raises(UserError):
        serve(out / "missing")


def test_serve_forever_prints_its_url_and_stops_on_ctrl_c(corpus: tuple[Path, SynthSummary, int]) -> None:
    port = free_port()
    code = "import sys; from pairsift.pipeline.serve import serve_forever; serve_forever(sys.argv[1], port=int(sys.argv[2]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(corpus[0]), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}" in line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/missing.png")
        assert conn.getresponse().status == 404
        conn.close()
        os.kill(proc.pid, signal.SIGINT)
        rc, err = proc.wait(timeout=20), proc.stderr.read()  # type: ignore[union-attr]
        assert (rc, err) == (0, "")  # stopped cleanly; no request logging, no traceback
    finally:
        if proc.poll() is None:
            proc.kill()
