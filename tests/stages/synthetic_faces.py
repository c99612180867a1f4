"""Drawn faces that OpenCV's frontal-face cascade sees as faces: an oval of skin, dark eye sockets
under brows, a lighter nose bridge, nostrils and a mouth. Ground truth for the faces stage."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def draw_face(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(40, 120, 3)))
    d = ImageDraw.Draw(img)
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05) * size, size / 2
    w, h = size * 0.5, size * 0.64
    skin = tuple(int(c * rng.uniform(0.6, 1.0)) for c in (235, 190, 160))
    d.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=skin)
    eye_y, eye_x = cy - h * 0.10, w * 0.21
    socket = tuple(int(c * 0.55) for c in skin)
    for side in (-1, 1):
        x = cx + side * eye_x
        d.ellipse([x - w * 0.13, eye_y - h * 0.05, x + w * 0.13, eye_y + h * 0.05], fill=socket)
        d.ellipse([x - w * 0.045, eye_y - h * 0.03, x + w * 0.045, eye_y + h * 0.03], fill=(25, 20, 20))
        d.rectangle([x - w * 0.14, eye_y - h * 0.12, x + w * 0.14, eye_y - h * 0.09], fill=(50, 35, 25))
    d.rectangle([cx - w * 0.04, eye_y, cx + w * 0.04, cy + h * 0.12], fill=tuple(min(255, int(c * 1.08)) for c in skin))
    d.ellipse([cx - w * 0.09, cy + h * 0.10, cx + w * 0.09, cy + h * 0.15], fill=tuple(int(c * 0.6) for c in skin))
    d.ellipse([cx - w * 0.2, cy + h * 0.2, cx + w * 0.2, cy + h * 0.27], fill=(120, 40, 40))
    return img.filter(ImageFilter.GaussianBlur(size / 100))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()
