"""The synthetic "web": procedurally drawn images of known concepts with alt-text-like captions.

A concept is a colour and a shape ("red circle"). Pool rows draw their image concept from a Zipf
law over a seeded permutation of the concepts, so the pool is long-tailed like real alt-text. Each
row carries at most one defect (a caption naming another concept, boilerplate, another language,
a duplicate, a tiny or extreme image, a broken file, a dead link) at the fractions of `DefectMix`.

    <out>/web/img/XX/NAME.{jpg,png,webp}   the served files (`pipeline.serve`)
    <out>/urls.parquet                     url, caption: the only thing the pipeline reads
    <out>/ground_truth.parquet             what every row really is (never read by the pipeline)
    <out>/seed/, <out>/test/               clean webdataset sets (test: classnames/templates.json)
    <out>/summary.json                     counts, written last

Everything is drawn from seeded generators keyed by (seed, purpose, row), so the output does not
depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pairsift.common.tars import write_tar
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.synth_draw import (
    EXTENSIONS,
    FORMAT_P,
    FORMATS,
    SAMPLES_PER_TAR,
    TEXTURES,
    ZERO_SHOT_TEMPLATES,
    _concepts,
    boilerplate_caption,
    corrupt_bytes,
    draw_concept,
    encode,
    english_caption,
    foreign_caption,
    zipf_probs,
)


class DefectMix(BaseModel):
    """Fractions of the pool that carry each defect; the rest is clean."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mismatched: float = Field(0.45, ge=0, le=1, description="caption names another concept")
    boilerplate: float = Field(0.10, ge=0, le=1, description="IMG_1234.jpg, click here, ...")
    non_english: float = Field(0.03, ge=0, le=1, description="es/de/fr caption of the concept")
    duplicates: float = Field(0.05, ge=0, le=1, description="half exact repeats, half same url")
    tiny: float = Field(0.02, ge=0, le=1, description="<= 16 px per side")
    extreme_aspect: float = Field(0.02, ge=0, le=1, description=">= 6:1")
    corrupt: float = Field(0.01, ge=0, le=1, description="undecodable bytes with an image extension")
    dead_link: float = Field(0.02, ge=0, le=1, description="404")

    @model_validator(mode="after")
    def _at_most_one(self) -> DefectMix:
        if sum(self.model_dump().values()) > 1.0 + 1e-9:
            raise ValueError("defect fractions add up to more than 1")
        return self


class SynthSummary(BaseModel):
    out_dir: str
    n: int
    seed: int
    base_url: str
    mix: DefectMix
    concepts: list[str] = Field(description="index = label")
    zipf: float
    zipf_order: list[str] = Field(description="concepts from most to least frequent by design")
    defect_counts: dict[str, int]
    concept_counts: dict[str, int] = Field(description="image concepts of rows with a served image")
    format_counts: dict[str, int]
    n_files: int
    web_bytes: int
    seed_size: int
    test_size: int
    seconds: float


# -- concepts -------------------------------------------------------------------------------------




# -- rendering workers ----------------------------------------------------------------------------

# A pool job: (row, relative path, colour, shape, width, height, texture, format, corrupt).
PoolJob = tuple[int, str, str, str, int, int, str, str, bool]
# A clean-set job: (key, colour, shape, width, height, texture).
SampleJob = tuple[int, str, str, int, int, str]


def _rng(seed: int, purpose: str, index: int) -> random.Random:
    # String seeds hash with SHA-512 in CPython: stable across runs and PYTHONHASHSEED.
    return random.Random(f"{seed}/{purpose}/{index}")


def _render_pool(jobs: list[PoolJob], web_dir: str, seed: int) -> int:
    """Draw, encode and write one chunk of pool images; returns the bytes written."""
    total = 0
    for row, rel, colour, shape, w, h, texture, fmt, corrupt in jobs:
        rnd = _rng(seed, "pool", row)
        data = encode(draw_concept(rnd, colour, shape, w, h, texture), fmt, rnd)
        if corrupt:
            data = corrupt_bytes(rnd, data, fmt)
        (Path(web_dir) / rel).write_bytes(data)
        total += len(data)
    return total


def _render_samples(jobs: list[SampleJob], seed: int, purpose: str) -> list[bytes]:
    out = []
    for key, colour, shape, w, h, texture in jobs:
        rnd = _rng(seed, purpose, key)
        buf = io.BytesIO()
        draw_concept(rnd, colour, shape, w, h, texture).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class _Runner:
    """Runs chunk functions in a process pool (or inline for one worker / little work)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def map(self, fn: Any, chunks: list[Any], *args: Any) -> list[Any]:
        if self.workers <= 1 or len(chunks) <= 1:
            return [fn(c, *args) for c in chunks]
        if self.pool is None:
            # forkserver: safe when the caller already runs threads (Ray, torch, an HTTP server);
            # preloading this module there means workers start without re-importing numpy and PIL.
            ctx = get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        futures = [self.pool.submit(fn, c, *args) for c in chunks]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# -- the pool plan --------------------------------------------------------------------------------


def _sizes(rng: np.random.Generator, n: int, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Width and height per row: mostly 48-128 px near-square; tiny and extreme rows as named."""
    small = rng.random(n) < 0.92
    lo, hi = np.where(small, 48, 129), np.where(small, 128, 200)
    w = rng.integers(lo, hi + 1)
    h = np.clip(np.round(w / np.exp(rng.uniform(math.log(0.75), math.log(4 / 3), n))), lo, hi).astype(int)
    tiny = kind == "tiny"
    w[tiny], h[tiny] = rng.integers(6, 17, tiny.sum()), rng.integers(6, 17, tiny.sum())
    ext = np.flatnonzero(kind == "extreme_aspect")
    long_side = rng.integers(120, 321, ext.size)
    short = np.maximum(8, np.floor(long_side / rng.uniform(6.0, 10.0, ext.size))).astype(int)
    short = np.minimum(short, long_side // 6)
    wide = rng.random(ext.size) < 0.5
    w[ext] = np.where(wide, long_side, short)
    h[ext] = np.where(wide, short, long_side)
    return w, h


def _counts(n: int, mix: DefectMix) -> dict[str, int]:
    fractions = mix.model_dump()
    counts = {k: round(v * n) for k, v in fractions.items()}
    while sum(counts.values()) > n:  # rounding overshoot on tiny pools
        counts[max(counts, key=counts.get)] -= 1  # type: ignore[arg-type]
    return counts


def _plan_originals(n_orig: int, counts: dict[str, int], seed: int) -> np.ndarray:
    kinds = ["mismatched", "boilerplate", "non_english", "tiny", "extreme_aspect", "corrupt", "dead_link"]
    labels = [k for k in kinds for _ in range(counts[k])]
    labels += ["none"] * (n_orig - len(labels))
    return np.random.default_rng([seed, 1]).permutation(np.array(labels, dtype=object))


def _insert_duplicates(defects: np.ndarray, n_exact: int, n_url: int, seed: int) -> list[tuple[str, int]]:
    """Final row order as (defect, index of the original row it copies or is) pairs.

    A duplicate copies an earlier original with a served, matching-or-mismatched image and is placed
    at a random time after it, so every duplicate comes after its source in urls.parquet.
    """
    rng = np.random.default_rng([seed, 2])
    m = len(defects)
    sources = np.flatnonzero(np.isin(defects, ["none", "mismatched"]))
    if sources.size == 0:
        sources = np.arange(m)
    events: list[tuple[float, str, int]] = [(float(i), str(d), i) for i, d in enumerate(defects)]
    if m and n_exact + n_url:
        src = rng.choice(sources, n_exact + n_url)
        times = src + rng.uniform(0.01, 1.0, src.size) * (m - src)
        kinds = ["duplicate_exact"] * n_exact + ["duplicate_url"] * n_url
        events += [(float(t), k, int(s)) for t, k, s in zip(times, kinds, src, strict=True)]
    events.sort(key=lambda e: e[0])
    return [(k, s) for _, k, s in events]


def _url_path(seed: int, row: int, fmt: str) -> str:
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).hexdigest()
    return f"img/{digest[:2]}/{digest[2:]}.{EXTENSIONS[fmt]}"


def _build_pool(n: int, seed: int, base_url: str, mix: DefectMix, concepts: list[tuple[str, str]],
                probs: np.ndarray) -> tuple[list[dict[str, Any]], list[PoolJob]]:
    counts = _counts(n, mix)
    n_exact = counts["duplicates"] // 2
    n_url = counts["duplicates"] - n_exact
    orig_defects = _plan_originals(n - counts["duplicates"], counts, seed)
    m = len(orig_defects)
    rng = np.random.default_rng([seed, 3])
    k = len(concepts)
    concept = rng.choice(k, m, p=probs)
    other = rng.choice(k, m, p=probs)
    # A mismatched caption names a different concept, still Zipf-distributed like real alt-text.
    clash = other == concept
    other[clash] = (concept[clash] + rng.integers(1, k, clash.sum())) % k
    fmt = rng.choice(len(FORMATS), m, p=FORMAT_P)
    texture = rng.integers(0, len(TEXTURES), m)
    w, h = _sizes(rng, m, orig_defects)
    names = [f"{c} {s}" for c, s in concepts]

    rows: list[dict[str, Any]] = []
    jobs: list[PoolJob] = []
    first_row: dict[int, int] = {}
    for row, (defect, i) in enumerate(_insert_duplicates(orig_defects, n_exact, n_url, seed)):
        rnd = _rng(seed, "caption", row)
        colour, shape = concepts[concept[i]]
        tex = TEXTURES[texture[i]]
        if defect.startswith("duplicate"):
            src = rows[first_row[i]]
            caption = src["caption"]
            if defect == "duplicate_url":
                while caption == src["caption"]:
                    caption = english_caption(rnd, names[concept[i]], tex, int(w[i]), int(h[i]))
            rows.append({**src, "caption": caption, "row": row, "defect": defect, "source_row": src["row"],
                         "caption_concept": src["caption_concept"] if defect == "duplicate_exact"
                         else names[concept[i]]})
            continue
        first_row[i] = row
        f = FORMATS[fmt[i]]
        cap_idx = other[i] if defect == "mismatched" else concept[i]
        if defect == "boilerplate":
            caption, cap_concept = boilerplate_caption(rnd), None
        elif defect == "non_english":
            caption, cap_concept = foreign_caption(rnd, colour, shape, tex), names[cap_idx]
        else:
            caption = english_caption(rnd, names[cap_idx], tex, int(w[i]), int(h[i]))
            cap_concept = names[cap_idx]
        rel = _url_path(seed, row, f)
        has_image = defect not in ("dead_link", "corrupt")
        rows.append({
            "url": f"{base_url}/{rel}", "caption": caption, "row": row,
            "concept": names[concept[i]] if has_image else None, "caption_concept": cap_concept,
            "defect": defect, "format": f, "width": int(w[i]) if has_image else None,
            "height": int(h[i]) if has_image else None, "source_row": None,
        })
        if defect != "dead_link":
            jobs.append((row, rel, colour, shape, int(w[i]), int(h[i]), tex, f, defect == "corrupt"))
    return rows, jobs


# -- clean sets -----------------------------------------------------------------------------------


def _write_tars(out: Path, samples: list[tuple[int, str, dict[str, Any]]], images: list[bytes]) -> None:
    """Deterministic webdataset tars (fixed mtime/owner) of KEY.jpg, KEY.txt, KEY.json, plus sizes.json."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for t, start in enumerate(range(0, len(samples), SAMPLES_PER_TAR)):
        name = f"{t:05d}.tar"
        part = list(zip(samples[start : start + SAMPLES_PER_TAR], images[start : start + SAMPLES_PER_TAR],
                        strict=True))
        with write_tar(out / name) as tar:
            for (key, caption, meta), image in part:
                tar.add_sample([(f"{key:06d}.jpg", image), (f"{key:06d}.txt", caption.encode()),
                                (f"{key:06d}.json", json.dumps(meta).encode())])
        sizes[name] = len(part)
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))


def _clean_set(runner: _Runner, out: Path, labels: np.ndarray, seed: int, purpose: str,
               concepts: list[tuple[str, str]]) -> None:
    rng = np.random.default_rng([seed, 4 if purpose == "seed" else 5])
    n = len(labels)
    texture = rng.integers(0, len(TEXTURES), n)
    w, h = _sizes(rng, n, np.array(["none"] * n, dtype=object))
    jobs: list[SampleJob] = []
    samples = []
    for key, label in enumerate(labels):
        colour, shape = concepts[label]
        tex = TEXTURES[texture[key]]
        caption = english_caption(_rng(seed, f"{purpose}-caption", key), f"{colour} {shape}", tex,
                                  int(w[key]), int(h[key]))
        jobs.append((key, colour, shape, int(w[key]), int(h[key]), tex))
        samples.append((key, caption, {"label": int(label), "concept": f"{colour} {shape}", "caption": caption}))
    images = [b for chunk in runner.map(_render_samples, _chunks(jobs, 400), seed, purpose) for b in chunk]
    _write_tars(out, samples, images)


# -- entry point ----------------------------------------------------------------------------------


def _prepare(out_dir: Path, overwrite: bool) -> None:
    ours = ["web", "seed", "test", "urls.parquet", "ground_truth.parquet", "summary.json"]
    present = [p for p in ours if (out_dir / p).exists()]
    if present and not overwrite:
        raise UserError(f"{out_dir} already holds a synthetic corpus ({present[0]}); "
                        "choose an empty directory or pass overwrite")
    for p in present:
        path = out_dir / p
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror}") from None


def synthesize(out_dir: Path, n: int, seed: int = 0, base_url: str = "http://127.0.0.1:8765",
               mix: DefectMix | None = None, n_concepts: int = 48, zipf: float = 1.1, seed_size: int = 1920,
               test_per_concept: int = 50, workers: int = 2, overwrite: bool = False) -> SynthSummary:
    """Draw a synthetic web of `n` pool rows under `out_dir`; see the module note for the layout.

    `base_url` is where `pipeline.serve` will serve `<out_dir>/web/` (pick the port first with
    `serve.free_port`). The same arguments always give the same files.
    """
    start = time.perf_counter()
    mix = mix or DefectMix()
    if n < 1 or seed_size < 0 or test_per_concept < 0 or zipf < 0 or workers < 1:
        raise UserError("n and workers must be >= 1; seed_size, test_per_concept and zipf >= 0")
    if not base_url.startswith(("http://", "https://")):
        raise UserError(f"base_url must start with http:// or https://, got {base_url!r}")
    base_url = base_url.rstrip("/")
    concepts = _concepts(n_concepts)
    names = [f"{c} {s}" for c, s in concepts]
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite)
    probs, order = zipf_probs(n_concepts, zipf, seed)
    rows, jobs = _build_pool(n, seed, base_url, mix, concepts, probs)

    web = out_dir / "web"
    for rel in {j[1].rsplit("/", 1)[0] for j in jobs}:
        (web / rel).mkdir(parents=True, exist_ok=True)
    runner = _Runner(workers)
    try:
        web_bytes = sum(runner.map(_render_pool, _chunks(jobs, 500), str(web), seed))
        seed_labels = np.random.default_rng([seed, 6]).choice(n_concepts, seed_size, p=probs)
        _clean_set(runner, out_dir / "seed", seed_labels, seed, "seed", concepts)
        test_labels = np.random.default_rng([seed, 8]).permutation(np.repeat(np.arange(n_concepts),
                                                                             test_per_concept))
        _clean_set(runner, out_dir / "test", test_labels, seed, "test", concepts)
    finally:
        runner.close()
    (out_dir / "test" / "classnames.json").write_text(json.dumps(names, indent=1))
    (out_dir / "test" / "templates.json").write_text(json.dumps(ZERO_SHOT_TEMPLATES, indent=1))

    table = pa.Table.from_pylist(rows, schema=_GROUND_TRUTH)
    pq.write_table(table.select(["url", "caption"]), out_dir / "urls.parquet")
    pq.write_table(table, out_dir / "ground_truth.parquet")
    served = [r for r in rows if r["concept"] is not None and r["defect"] != "duplicate_exact"
              and r["defect"] != "duplicate_url"]
    summary = SynthSummary(
        out_dir=str(out_dir), n=n, seed=seed, base_url=base_url, mix=mix, concepts=names, zipf=zipf,
        zipf_order=[names[i] for i in order], defect_counts=dict(Counter(r["defect"] for r in rows)),
        concept_counts=dict(Counter(r["concept"] for r in served).most_common()),
        format_counts=dict(Counter(j[7] for j in jobs)), n_files=len(jobs), web_bytes=web_bytes,
        seed_size=seed_size, test_size=len(test_labels), seconds=round(time.perf_counter() - start, 2),
    )
    (out_dir / "summary.json").write_text(summary.model_dump_json(indent=1))
    return summary


_GROUND_TRUTH = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("row", pa.int64()), ("concept", pa.string()),
    ("caption_concept", pa.string()), ("defect", pa.string()), ("format", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("source_row", pa.int64()),
])
