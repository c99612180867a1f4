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
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pairsift.common.images import open_image
from pairsift.common.tars import write_tar
from pairsift.pipeline.errors import UserError

# Object colours, far apart in RGB (closest pair ~79) so the colour of the drawn object is
# unambiguous; the first 8 make the default 48-concept grid.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (35, 155, 50),
    "blue": (35, 75, 215),
    "yellow": (250, 230, 20),
    "purple": (125, 45, 170),
    "orange": (245, 130, 20),
    "pink": (245, 140, 190),
    "brown": (125, 75, 35),
    "cyan": (40, 200, 215),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "grey": (130, 130, 130),
    "magenta": (215, 40, 200),
    "navy": (25, 30, 110),
    "lime": (170, 230, 50),
    "teal": (20, 125, 125),
}
# Every shape covers its own centre, so the middle of the image is always the object's colour.
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart", "arrow", "oval"]
# Muted backgrounds; each image picks one far from its object colour.
BACKGROUNDS = [
    (236, 233, 222), (200, 200, 200), (226, 212, 182), (190, 214, 234), (204, 228, 204),
    (58, 62, 72), (202, 172, 132), (216, 206, 236), (74, 74, 74), (150, 160, 140),
]
MIN_BACKGROUND_DISTANCE = 110.0
TEXTURES = ["plain", "stripes", "dots", "noise"]
FORMATS = ["jpeg", "png", "webp"]
FORMAT_P = [0.7, 0.2, 0.1]
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
DEFECTS = [
    "none", "mismatched", "boilerplate", "non_english", "duplicate_exact", "duplicate_url",
    "tiny", "extreme_aspect", "corrupt", "dead_link",
]
SAMPLES_PER_TAR = 1000
ZERO_SHOT_TEMPLATES = [
    "a photo of a {}.", "a drawing of a {}.", "an image of a {}.", "a picture of the {}.",
    "a {} on a plain background.", "a {} on a striped background.", "a close-up of a {}.",
    "a small {}.", "a big {}.", "a simple {}.",
]

# -- captions -------------------------------------------------------------------------------------

TEXTURE_WORDS = {
    "plain": ["plain", "white", "simple"], "stripes": ["striped", "lined"],
    "dots": ["dotted", "polka dot"], "noise": ["grainy", "noisy"],
}
EN_TEMPLATES = [
    "{a} {c}", "{c}", "{a} {c} on a {tex} background", "{C} - stock photo", "photo of {a} {c} {num}",
    "cheap {c} wallpaper hd", "{c} icon png", "{c} clipart vector illustration", "close-up of {a} {c}",
    "{a} {c} sticker for laptop", "Buy {C} online | free shipping", "my {c} :)", "{c} {w}x{h}",
    "the {c} we saw yesterday", "a simple {c} drawing", "{C}", "{a} {c}, isolated",
    "Best {c} ideas {year}", "{c} on {tex} background", "{c} | free images",
]
BOILERPLATE = [
    "IMG_{n4}.jpg", "DSC_{n4}.JPG", "DSC{n5}.jpg", "P{n7}.JPG", "image{n3}.png", "click here", "image",
    "untitled", "Untitled-{n1}", "Download now", "photo", "img", "thumbnail", "placeholder",
    "Click to enlarge", "View full size", "Screenshot {year}-0{n1}-1{n1} at 10.2{n1}.31", "logo",
    "banner", "spacer", "{n4}", "Read more", "Share this:", "picture", "no image available",
]
# Non-English captions. Colours: (es masc, es fem, German adjective stem, fr masc, fr fem).
COLOUR_WORDS = {
    "red": ("rojo", "roja", "rot", "rouge", "rouge"),
    "green": ("verde", "verde", "grün", "vert", "verte"),
    "blue": ("azul", "azul", "blau", "bleu", "bleue"),
    "yellow": ("amarillo", "amarilla", "gelb", "jaune", "jaune"),
    "purple": ("morado", "morada", "violett", "violet", "violette"),
    "orange": ("naranja", "naranja", "orangefarben", "orange", "orange"),
    "pink": ("rosa", "rosa", "pink", "rose", "rose"),
    "brown": ("marrón", "marrón", "braun", "marron", "marron"),
    "cyan": ("cian", "cian", "cyanfarben", "cyan", "cyan"),
    "white": ("blanco", "blanca", "weiß", "blanc", "blanche"),
    "black": ("negro", "negra", "schwarz", "noir", "noire"),
    "grey": ("gris", "gris", "grau", "gris", "grise"),
    "magenta": ("magenta", "magenta", "magentafarben", "magenta", "magenta"),
    "navy": ("azul marino", "azul marino", "marineblau", "bleu marine", "bleu marine"),
    "lime": ("verde lima", "verde lima", "hellgrün", "vert citron", "vert citron"),
    "teal": ("verde azulado", "verde azulada", "petrolfarben", "bleu canard", "bleu canard"),
}
# Shapes: (es noun, es gender, de noun, de gender, fr noun, fr gender).
SHAPE_WORDS = {
    "circle": ("círculo", "m", "Kreis", "m", "cercle", "m"),
    "square": ("cuadrado", "m", "Quadrat", "n", "carré", "m"),
    "triangle": ("triángulo", "m", "Dreieck", "n", "triangle", "m"),
    "star": ("estrella", "f", "Stern", "m", "étoile", "f"),
    "cross": ("cruz", "f", "Kreuz", "n", "croix", "f"),
    "diamond": ("rombo", "m", "Raute", "f", "losange", "m"),
    "hexagon": ("hexágono", "m", "Sechseck", "n", "hexagone", "m"),
    "heart": ("corazón", "m", "Herz", "n", "cœur", "m"),
    "arrow": ("flecha", "f", "Pfeil", "m", "flèche", "f"),
    "oval": ("óvalo", "m", "Oval", "n", "ovale", "m"),
}
FOREIGN_TEMPLATES = {
    "es": ["foto de {art} {np} sobre fondo {tex}", "{np} sobre un fondo {tex}, dibujo sencillo",
           "fondo de pantalla de {art} {np}, barato y bonito", "comprar {np} en línea con envío gratis",
           "{Np} - foto de archivo libre de derechos", "dibujo de {art} {np} muy bonito para niños"],
    "de": ["Foto: {np} auf {tex} Hintergrund", "ein Bild mit {np_dat} auf {tex} Hintergrund",
           "{np} günstig online kaufen, schneller Versand", "Hintergrundbild mit {np_dat} für den Desktop",
           "{Np} - Stockfoto und lizenzfreie Bilder", "Zeichnung: {np}, einfach und schön für Kinder"],
    "fr": ["photo d'{art} {np} sur fond {tex}", "{np} sur un fond {tex}, dessin simple",
           "fond d'écran avec {art} {np}, pas cher", "acheter {np} en ligne avec livraison gratuite",
           "{Np} - photo de stock libre de droits", "dessin d'{art} {np} très joli pour les enfants"],
}
FOREIGN_TEXTURE = {
    "es": {"plain": "liso", "stripes": "rayado", "dots": "de lunares", "noise": "granulado"},
    "de": {"plain": "einfarbigem", "stripes": "gestreiftem", "dots": "gepunktetem", "noise": "körnigem"},
    "fr": {"plain": "uni", "stripes": "rayé", "dots": "à pois", "noise": "granuleux"},
}


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


def _grid(n_concepts: int) -> tuple[int, int]:
    """Colours x shapes for n concepts: 8 x 6 at 48, growing both (colours faster) beyond."""
    n_colours = min(len(COLOURS), max(1, math.ceil(math.sqrt(n_concepts * 4 / 3))))
    n_shapes = math.ceil(n_concepts / n_colours)
    if n_shapes > len(SHAPES):
        n_shapes = len(SHAPES)
        n_colours = math.ceil(n_concepts / n_shapes)
    if n_concepts < 2 or n_colours > len(COLOURS):
        raise UserError(f"n_concepts must be between 2 and {len(COLOURS) * len(SHAPES)}, got {n_concepts}")
    return n_colours, n_shapes


def _concepts(n_concepts: int) -> list[tuple[str, str]]:
    n_colours, n_shapes = _grid(n_concepts)
    grid = [(c, s) for c in list(COLOURS)[:n_colours] for s in SHAPES[:n_shapes]]
    return grid[:n_concepts]


def concept_names(n_concepts: int) -> list[str]:
    """The concept names, index = label: "red circle", "red square", ..."""
    return [f"{c} {s}" for c, s in _concepts(n_concepts)]


def zipf_probs(n_concepts: int, zipf: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probability per concept index, concept indices from most to least frequent)."""
    order = np.random.default_rng([seed, 7]).permutation(n_concepts)
    p_rank = 1.0 / np.arange(1, n_concepts + 1) ** zipf
    probs = np.empty(n_concepts)
    probs[order] = p_rank / p_rank.sum()
    return probs, order


# -- captions -------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def english_caption(rnd: random.Random, concept: str, texture: str, w: int, h: int) -> str:
    template = rnd.choice(EN_TEMPLATES)
    return template.format(
        a=_article(concept), c=concept, C=concept.title(), tex=rnd.choice(TEXTURE_WORDS[texture]),
        num=rnd.randrange(100, 10000), w=w, h=h, year=rnd.randrange(2012, 2025),
    )


def foreign_caption(rnd: random.Random, colour: str, shape: str, texture: str) -> str:
    lang = rnd.choice(["es", "de", "fr"])
    es_m, es_f, de_stem, fr_m, fr_f = COLOUR_WORDS[colour]
    es_noun, es_g, de_noun, de_g, fr_noun, fr_g = SHAPE_WORDS[shape]
    if lang == "es":
        np_, art = f"{es_noun} {es_m if es_g == 'm' else es_f}", "un" if es_g == "m" else "una"
        np_dat = np_
    elif lang == "de":
        # Strong declension without article: roter Kreis / rote Raute / rotes Quadrat; dative -em/-er.
        np_ = f"{de_stem}{ {'m': 'er', 'f': 'e', 'n': 'es'}[de_g]} {de_noun}"
        np_dat, art = f"{de_stem}{ {'m': 'em', 'f': 'er', 'n': 'em'}[de_g]} {de_noun}", ""
    else:
        np_, art = f"{fr_noun} {fr_m if fr_g == 'm' else fr_f}", "un" if fr_g == "m" else "une"
        np_dat = np_
    template = rnd.choice(FOREIGN_TEMPLATES[lang])
    return template.format(
        np=np_, Np=np_[0].upper() + np_[1:], np_dat=np_dat, art=art, tex=FOREIGN_TEXTURE[lang][texture]
    )


def boilerplate_caption(rnd: random.Random) -> str:
    return rnd.choice(BOILERPLATE).format(
        n1=rnd.randrange(1, 10), n3=rnd.randrange(100, 1000), n4=rnd.randrange(1000, 10000),
        n5=rnd.randrange(10000, 100000), n7=rnd.randrange(1000000, 10000000), year=rnd.randrange(2012, 2025),
    )


# -- drawing --------------------------------------------------------------------------------------


def _shape_polygon(shape: str, r: float) -> list[tuple[float, float]]:
    """The outline of a shape of radius r around (0, 0); every one contains a disc of >= 0.3 r."""
    if shape in ("circle", "oval"):
        ry = r if shape == "circle" else 0.55 * r
        return [(r * math.cos(t), ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    if shape == "square":
        a = 0.85 * r
        return [(-a, -a), (a, -a), (a, a), (-a, a)]
    if shape == "diamond":
        return [(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)]
    if shape == "triangle":
        return [(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "hexagon":
        return [(r * math.cos(t), r * math.sin(t)) for t in np.arange(6) * math.pi / 3]
    if shape == "star":
        return [((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = 0.3 * r, r
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                (-b, -a), (-a, -a)]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs, ys = 16 * np.sin(ts) ** 3, -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return [(x * r / 16, (y + 2.5) * r / 16) for x, y in zip(xs, ys, strict=True)]
    if shape == "arrow":
        s, hx, hy = 0.3 * r, 0.1 * r, 0.7 * r
        return [(-r, -s), (hx, -s), (hx, -hy), (r, 0), (hx, hy), (hx, s), (-r, s)]
    raise ValueError(f"unknown shape {shape!r}")


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _background(rnd: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    far = [b for b in BACKGROUNDS if math.dist(b, rgb) >= MIN_BACKGROUND_DISTANCE]
    return rnd.choice(far)


def _shade(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    # Texture marks stay near the background: lighter on dark backgrounds, darker on light ones.
    sign = 1 if sum(rgb) < 384 else -1
    return tuple(int(min(255, max(0, v + sign * delta))) for v in rgb)  # type: ignore[return-value]


def _background_image(rnd: random.Random, bg: tuple[int, int, int], texture: str, w: int, h: int) -> Image.Image:
    """The textured background; texture marks stay close to the background colour."""
    if texture == "noise":
        noise = np.random.default_rng(rnd.getrandbits(64)).integers(-28, 29, size=(h, w, 1), dtype=np.int16)
        return Image.fromarray(np.clip(np.array(bg, np.int16) + noise, 0, 255).astype(np.uint8))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    mark = _shade(bg, rnd.randrange(25, 45))
    if texture == "stripes":
        step, width, slant = rnd.randrange(4, 11), rnd.randrange(1, 3), rnd.choice([0, 1, -1, None])
        if slant is None:  # horizontal
            for y in range(rnd.randrange(step), h, step):
                draw.line([(0, y), (w, y)], fill=mark, width=width)
        else:  # vertical or diagonal
            for x in range(-h, w + h, step):
                draw.line([(x, 0), (x + slant * h, h)], fill=mark, width=width)
    elif texture == "dots":  # a staggered grid
        step, rad = rnd.randrange(6, 13), rnd.choice([1.0, 1.5, 2.0])
        off = rnd.randrange(step)
        for y in range(off, h, step):
            for x in range(off + (y // step % 2) * step // 2, w, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=mark)
    return img


def draw_concept(rnd: random.Random, colour: str, shape: str, w: int, h: int, texture: str) -> Image.Image:
    """One picture of `colour shape` centred on a textured background."""
    rgb = COLOURS[colour]
    bg = _background(rnd, rgb)
    img = _background_image(rnd, bg, texture, w, h)
    side = min(w, h)
    # Small jitter and rotation are nuisances; the centre stays inside the object (inner disc >= 0.3 r).
    r = rnd.uniform(0.30, 0.42) * side
    cx, cy = w / 2 + rnd.uniform(-0.02, 0.02) * side, h / 2 + rnd.uniform(-0.02, 0.02) * side
    angle = rnd.uniform(-0.15, 0.15) + (rnd.randrange(4) * math.pi / 2 if shape == "arrow" else 0.0)
    fill = tuple(min(255, max(0, v + rnd.randrange(-12, 13))) for v in rgb)
    points = [(cx + x, cy + y) for x, y in _rotate(_shape_polygon(shape, r), angle)]
    ImageDraw.Draw(img).polygon(points, fill=fill)
    return img


def encode(img: Image.Image, fmt: str, rnd: random.Random) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=rnd.randrange(70, 96))
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=3)
    else:
        img.save(buf, "WEBP", quality=rnd.randrange(70, 91), method=0)
    return buf.getvalue()


def _decodes(data: bytes) -> bool:
    try:
        with open_image(data) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not decodable", which is what we want
        return False


def _header_end(data: bytes, fmt: str) -> int:
    """Where pixel data starts: cutting before it leaves nothing any decoder can show."""
    marker = {"jpeg": b"\xff\xda", "png": b"IDAT", "webp": b"VP8"}[fmt]
    return max(data.find(marker), 12)


def corrupt_bytes(rnd: random.Random, data: bytes, fmt: str) -> bytes:
    """Bytes that carry an image's name but not an image: cut off, garbage, or an HTML error page."""
    kind = rnd.choice(["truncated", "garbage", "html"])
    if kind == "truncated":
        out = data[: rnd.randrange(8, _header_end(data, fmt))]
    elif kind == "garbage":
        out = data[:4] + rnd.randbytes(rnd.randrange(200, 2000))
    else:
        out = b"<!DOCTYPE html><html><head><title>Error</title></head><body>Image not found</body></html>"
    # Garbage that happens to decode is replaced by plain text (never happened in practice).
    return out if not _decodes(out) else b"not an image"


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
