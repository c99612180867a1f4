"""What the synthetic web looks like: its concepts (a colour and a shape), the captions written
about them (English templates, other languages, boilerplate), the drawn images and the ways a file
gets broken. ``pipeline/synth.py`` plans a pool with these and writes it.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from pairsift.common.images import open_image
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
