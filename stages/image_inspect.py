"""What the download stage checks in fetched bytes before img2dataset's Resizer decodes them.

PIL's lazy ``open_image`` (``pairsift.common.images``: only the formats pairsift supports, so an EPS
body never reaches Ghostscript) reads the header only: markup, unknown bytes or a format outside
that list are ``not_an_image``, and a declared size above ``max_pixels`` is ``image_too_large``
before a single pixel is decoded (a 50,000² PNG bomb is a few MB on the wire and 2.5 GB in memory).
The limit is this call's argument, never PIL's process-wide ``Image.MAX_IMAGE_PIXELS``, which other
stages in the same worker rely on. Images with an EXIF rotation, 16-bit samples or a format OpenCV
cannot read come back as a PNG that PIL made upright and 8-bit.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pairsift.common.images import decodable_formats, open_image

DECODE_ERROR = "decode_error"
NOT_AN_IMAGE = "not_an_image"
IMAGE_TOO_LARGE = "image_too_large"
# PIL refuses to open an image above twice its process-wide limit (DecompressionBombError), whatever
# we ask: the most pixels a ``max_pixels`` can allow without changing PIL's global for every stage.
PIL_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
EXIF_ORIENTATION = 0x0112
# Formats Pillow (or another tool) would parse but pairsift refuses: named in the row's error.
FOREIGN_MAGIC = (
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop PSD"),
    (b"icns", "Apple ICNS"),
)
# Formats OpenCV's imdecode reads correctly; the others open_image accepts (AVIF, HEIF) go through
# PIL first. OpenCV itself is never handed a format open_image refused (it reads no EPS anyway).
CV2_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
ORIENTED_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "TIFF"})  # where EXIF sits in the header


class Rejected(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def inspect_image(data: bytes, max_pixels: int) -> bytes:
    """Check ``data`` from its header alone and return bytes OpenCV can decode the right way up.

    Raises Rejected: not_an_image (markup, unknown bytes), image_too_large (declared pixels above
    ``max_pixels``, checked before decoding), decode_error (a broken header or body)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we say it ourselves, below
        try:
            image = open_image(data)  # lazy: reads the header, decodes nothing
        except Image.DecompressionBombError as exc:
            raise Rejected(IMAGE_TOO_LARGE, str(exc)) from None
        except UnidentifiedImageError:
            raise Rejected(NOT_AN_IMAGE, f"not an image pairsift decodes ({', '.join(decodable_formats())}): "
                                         f"{describe_bytes(data)}") from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for broken headers
            canvas = webp_canvas(data)  # libwebp refuses a canvas its frame does not fill: say why
            if canvas and canvas[0] * canvas[1] > max_pixels:
                raise Rejected(IMAGE_TOO_LARGE, _too_large(*canvas, max_pixels)) from None
            raise Rejected(DECODE_ERROR, f"broken image header: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(IMAGE_TOO_LARGE, _too_large(width, height, max_pixels))
    if width == 0 or height == 0:
        raise Rejected(DECODE_ERROR, f"empty image {width}x{height}")
    orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format in ORIENTED_FORMATS else 1
    if orientation in range(2, 9) or image.format not in CV2_FORMATS or _sixteen_bit(data, image):
        return _upright_png(image)
    return data


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"{width}x{height} = {width * height} pixels is above {max_pixels}"


def webp_canvas(data: bytes) -> tuple[int, int] | None:
    """The canvas an extended-format WebP (VP8X chunk) declares, from its first 30 bytes."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8X":
        return None
    return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1


def _sixteen_bit(data: bytes, image: Image.Image) -> bool:
    """16 bits per channel: OpenCV would keep them, and its 8-bit encoders then saturate every pixel
    to white. PIL reads such files as 8 bits (the high byte), so they take the PIL path."""
    png_depth = data[24] if image.format == "PNG" and len(data) > 24 and data[12:16] == b"IHDR" else 8
    return png_depth == 16 or image.mode.startswith("I;16") or image.mode == "I"


def _upright_png(image: Image.Image) -> bytes:
    """Decode with PIL, apply the EXIF orientation, re-encode losslessly (fast PNG) for the Resizer."""
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey: scale, don't clip, to 8 bits
            scale = 256 if image.mode.startswith("I;16") or max(image.getextrema()) > 255 else 1
            image = Image.fromarray((np.asarray(image, np.uint32) // scale).clip(0, 255).astype(np.uint8), "L")
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)
        return buffer.getvalue()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise Rejected(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None


def describe_bytes(data: bytes) -> str:
    """A short, log-safe description of what a non-image body looks like."""
    if not data:
        return "empty body"
    for magic, kind in FOREIGN_MAGIC:
        if data.startswith(magic):
            return f"{kind} document"
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<"):
        kind = (
            "SVG"
            if b"<svg" in head
            else "HTML"
            if b"<html" in head or b"<!doctype html" in head
            else "markup"
        )
        return f"{kind} document"
    return f"unknown format, starts with {data[:12]!r}"
