"""The image formats pairsift decodes, the one table of their file extensions, and the one way to open them.

Pillow, asked to open bytes with no ``formats=``, offers them to every plugin it has: an EPS body
from the web goes to Ghostscript (a PostScript interpreter, run as a subprocess where ``gs`` is
installed), and PSD, PDF-ish, ICNS, FITS, SPIDER... each get a parser pairsift never needs. So every
place that opens an image from the web or a shard calls ``open_image``, which names the formats:
the web's raster formats, plus AVIF/HEIF where a plugin for them is installed. Anything else is
``UnidentifiedImageError``, exactly as for bytes that are no image at all.
"""

from __future__ import annotations

import io
from typing import IO

from PIL import Image

# Pillow format names pairsift decodes. A camera JPEG with a second picture appended opens as
# format "MPO": Pillow's JPEG opener makes that choice itself, so "JPEG" covers it.
WEB_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
OPTIONAL_FORMATS = ("AVIF", "HEIF")  # Pillow's own AVIF plugin (when built with libavif), pillow-heif

# Tar member / file extension -> Pillow format: the one table shards, tars and folders are read with.
EXTENSIONS: dict[str, str] = {
    "jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP",
    "tif": "TIFF", "tiff": "TIFF", "avif": "AVIF", "heic": "HEIF", "heif": "HEIF",
}
UNKNOWN_EXTENSION = "bin"  # the member name for stored bytes whose format the magic bytes don't tell
IMAGE_MEMBER_EXTENSIONS = (*EXTENSIONS, UNKNOWN_EXTENSION)

# Leading bytes -> the extension pairsift writes for them (the first match wins).
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"WEBP", 8, "webp"),  # after "RIFF" and the length
    (b"GIF8", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"ftypavif", 4, "avif"),
    (b"ftypheic", 4, "heic"),
)


def decodable_formats() -> tuple[str, ...]:
    """The formats ``open_image`` accepts here: the web formats, plus the optional ones whose plugin
    this Pillow has registered (Pillow raises KeyError for a format name it does not know)."""
    Image.init()
    return tuple(f for f in WEB_FORMATS + OPTIONAL_FORMATS if f in Image.OPEN)


def open_image(data: bytes | IO[bytes]) -> Image.Image:
    """``Image.open`` restricted to ``decodable_formats()`` (lazy: reads the header only).

    Raises ``PIL.UnidentifiedImageError`` for every other format, before any of its parsers runs."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return Image.open(source, formats=decodable_formats())


def extension_of(data: bytes) -> str:
    """The member extension for image bytes, from their magic bytes; ``bin`` when none matches."""
    for magic, offset, extension in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            if extension == "webp" and data[:4] != b"RIFF":
                continue
            return extension
    return UNKNOWN_EXTENSION
