"""A tiny synthetic image-text webdataset for trainer tests and benchmarks/train.py.

12 concepts = 4 colours × 3 shapes drawn with PIL at 32×32, written pipeline-style:
``KEY.jpg``, ``KEY.txt`` (the alt-text), ``KEY.json`` (uid, url, caption, label, + extras) and
``sizes.json``; a test set also gets ``classnames.json`` and ``templates.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "models" / "tiny-vit.json")
CONCEPTS = [f"{c} {s}" for c in COLOURS for s in SHAPES]
CAPTION_TEMPLATES = ["a {}", "a photo of a {}", "{} on a plain background", "picture of a {}", "the {}"]
TEMPLATES = ["a photo of a {}.", "a {}."]


def draw(concept: str, rng: random.Random, size: int = 32) -> Image.Image:
    colour, shape = concept.split()
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 2 - 2)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(out: Path, n: int, per_shard: int, seed: int = 0, test_set: bool = False,
                 extra: Callable[[int, dict], dict] | None = None, corrupt_every: int = 0,
                 image_size: int = 32) -> Path:
    """``n`` samples in ceil(n / per_shard) tars under ``out``; returns ``out``.

    ``extra(i, meta)`` may add json fields (rewrites, keep_prob, ...). Every ``corrupt_every``-th
    sample gets truncated image bytes (a decode error the trainer must skip)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = {}
    for s, start in enumerate(range(0, n, per_shard)):
        name = f"{s:05d}.tar"
        count = min(per_shard, n - start)
        with tarfile.open(out / name, "w") as tf:
            for i in range(start, start + count):
                label = rng.randrange(len(CONCEPTS))
                concept = CONCEPTS[label]
                caption = rng.choice(CAPTION_TEMPLATES).format(concept)
                url = f"http://127.0.0.1/img/{seed}/{i}.jpg"
                meta = {"uid": hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=16).hexdigest(),
                        "url": url, "caption": caption, "label": label}
                if extra is not None:
                    meta = extra(i, meta)
                image = _jpeg(draw(concept, rng, image_size))
                if corrupt_every and i % corrupt_every == corrupt_every - 1:
                    image = image[: len(image) // 3]
                key = f"{i:09d}"
                _add(tf, f"{key}.jpg", image)
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        sizes[name] = count
    (out / "sizes.json").write_text(json.dumps(sizes))
    if test_set:
        (out / "classnames.json").write_text(json.dumps(CONCEPTS))
        (out / "templates.json").write_text(json.dumps(TEMPLATES))
    return out


def tiny_config(out: Path, train: Path | str, **kw) -> dict:
    """A fast CPU training config for the tiny model; keyword arguments override top-level keys."""
    cfg = {"out": str(out), "model": TINY, "data": {"train": str(train)}, "batch_size": 32, "steps": 10,
           "lr": 2e-3, "warmup": 5, "threads": 1, "progress": False, "seed": 0}
    cfg.update(kw)
    return cfg
