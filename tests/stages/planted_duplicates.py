"""Planted duplicates with ground truth, for measuring ``dedup`` per kind of copy.

Originals are drawn with ``pairsift.pipeline.synth_draw.draw_concept`` (a random colour, shape, texture
and size, saved as JPEG); each gets one copy of every kind in ``KINDS``. ``recall_precision`` scores a
method's output against the families.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pairsift.pipeline.synth_draw import COLOURS, SHAPES, TEXTURES, draw_concept


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _crop(img: Image.Image) -> Image.Image:
    """Trim 2% off each side (a small crop)."""
    dx, dy = round(img.width * 0.02), round(img.height * 0.02)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


# kind -> how a copy is made from (the original's bytes, its decoded pixels)
KINDS: dict[str, Callable[[bytes, Image.Image], bytes]] = {
    "byte_copy": lambda data, img: data,
    "lossless_reencode": lambda data, img: _save(img, "PNG"),  # the same pixels, other bytes
    "lossy_reencode": lambda data, img: _save(img, "WEBP", quality=60),
    "jpeg_quality": lambda data, img: _save(img, "JPEG", quality=50),
    "resize": lambda data, img: _save(img.resize((img.width * 2 // 3, img.height * 2 // 3)), "JPEG", quality=90),
    "crop": lambda data, img: _save(_crop(img), "JPEG", quality=90),
    "flip": lambda data, img: _save(ImageOps.mirror(img), "JPEG", quality=90),
}


def plant(n_originals: int, seed: int = 0) -> list[dict]:
    """Rows (uid, image, family, kind): every original (kind ``original``) and one copy per kind."""
    rnd = random.Random(seed)
    rows = []
    for family in range(n_originals):
        img = draw_concept(rnd, rnd.choice(list(COLOURS)), rnd.choice(SHAPES), rnd.randrange(160, 321),
                           rnd.randrange(120, 281), rnd.choice(TEXTURES))
        data = _save(img, "JPEG", quality=90)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        rows.append({"family": family, "kind": "original", "image": data})
        rows += [{"family": family, "kind": kind, "image": make(data, decoded)} for kind, make in KINDS.items()]
    for i, row in enumerate(rows):  # uids in no particular order relative to the families
        row["uid"] = f"{(i * 2654435761) % 2**32:08x}{i:024x}"
    return rows


def as_table(rows: list[dict], columns: dict[str, pa.DataType]) -> pa.Table:
    return pa.table({name: pa.array([r[name] for r in rows], kind) for name, kind in columns.items()})


def groups_of(output: pa.Table) -> dict[str, str]:
    """uid -> its group (the kept uid) for rows in a group of two or more."""
    out = {}
    for row in output.select(["uid", "duplicate_of", "duplicate_group_size"]).to_pylist():
        if (row["duplicate_group_size"] or 0) > 1:
            out[row["uid"]] = row["duplicate_of"] or row["uid"]
    return out


def recall_precision(rows: list[dict], output: pa.Table, kind: str) -> tuple[float, float]:
    """Recall: the share of ``kind``'s copies in their original's group. Precision: the share of
    dropped rows that really are a copy of the row kept for them (same family)."""
    family = {r["uid"]: r["family"] for r in rows}
    groups = groups_of(output)
    originals = {r["family"]: r["uid"] for r in rows if r["kind"] == "original"}
    copies = [r for r in rows if r["kind"] == kind]
    caught = sum(1 for r in copies if r["uid"] in groups and groups[r["uid"]] == groups.get(originals[r["family"]]))
    dropped = [(r["uid"], r["duplicate_of"]) for r in output.select(["uid", "duplicate_of"]).to_pylist()
               if r["duplicate_of"] is not None]
    right = sum(1 for uid, kept in dropped if family[uid] == family[kept])
    return caught / len(copies), (right / len(dropped) if dropped else 1.0)


def clustered_embeddings(n_topics: int, families_per_topic: int, copies: int, dim: int, seed: int = 0):
    """Unit vectors: topics far apart, families within a topic at cosine ~0.7 of each other, a
    family's members (different draws of one concept) at cosine ~0.99. Returns (vectors, family)."""
    rng = np.random.default_rng(seed)
    vectors, family = [], []
    for topic in range(n_topics):
        centre = rng.standard_normal(dim)
        centre /= np.linalg.norm(centre)
        for f in range(families_per_topic):
            base = centre + 0.7 * rng.standard_normal(dim) / np.sqrt(dim)
            base /= np.linalg.norm(base)
            for _ in range(copies):
                v = base + 0.1 * rng.standard_normal(dim) / np.sqrt(dim)
                vectors.append(v / np.linalg.norm(v))
                family.append(topic * families_per_topic + f)
    return np.array(vectors, np.float32), np.array(family)
