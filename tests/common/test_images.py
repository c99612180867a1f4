"""Every place pairsift opens an image decodes only the formats it supports, through one helper."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, IcnsImagePlugin, Image, UnidentifiedImageError

from pairsift.common.images import EXTENSIONS, decodable_formats, extension_of, open_image

REPO = Path(__file__).resolve().parents[2]


def encode(fmt: str, size: tuple[int, int] = (16, 12), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 1).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def parsed(monkeypatch) -> list[str]:
    """Records every run of the EPS and ICNS parsers, and of Ghostscript."""
    calls: list[str] = []
    for plugin in (EpsImagePlugin.EpsImageFile, IcnsImagePlugin.IcnsImageFile):
        def recording_open(self, _open=plugin._open, _name=plugin.format):
            calls.append(_name)
            return _open(self)
        monkeypatch.setattr(plugin, "_open", recording_open)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append("gs"))
    return calls


def openers():
    """Each place an image from the web or a shard is decoded, as (name, bytes -> result or None)."""
    from pairsift.pipeline.report import thumbnail_uri
    from pairsift.stages.clip_decode import pil_preprocess, pil_rgb
    from pairsift.stages.engines import decode_image
    from pairsift.trainer.eval import _decode

    def opened(data: bytes):
        try:
            with open_image(data) as image:
                return image.size
        except UnidentifiedImageError:
            return None

    return [("open_image", opened), ("clip_decode.pil_rgb", pil_rgb),
            ("clip_decode.pil_preprocess", lambda d: pil_preprocess(d, lambda im: im.size)),
            ("engines.decode_image", lambda d: decode_image(d)[0]), ("report.thumbnail_uri", thumbnail_uri),
            ("trainer.eval._decode", _decode)]


@pytest.mark.parametrize("fmt", ["EPS", "ICNS"])
def test_no_opener_hands_a_foreign_format_to_its_parser(fmt, parsed):
    body = encode(fmt)
    with Image.open(io.BytesIO(body)) as image:  # Pillow left to itself parses it
        assert image.format == fmt
    assert parsed == [fmt]
    parsed.clear()
    for name, opener in openers():
        assert opener(body) is None, name
    assert parsed == []


@pytest.mark.parametrize(("fmt", "extension"), [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"),
                                                ("BMP", "bmp"), ("TIFF", "tiff")])
def test_every_supported_format_opens_everywhere_and_is_named_by_its_magic(fmt, extension):
    body = encode(fmt)
    assert extension_of(body) == extension and EXTENSIONS[extension] == fmt
    for name, opener in openers():
        assert opener(body) is not None, name


def test_avif_opens_where_pillow_has_the_plugin_and_unknown_bytes_are_bin():
    Image.init()
    assert ("AVIF" in decodable_formats()) == ("AVIF" in Image.OPEN)
    if "AVIF" in Image.OPEN:
        body = encode("AVIF")
        assert extension_of(body) == "avif"
        with open_image(body) as image:
            assert image.format == "AVIF"
    assert extension_of(b"%!PS-Adobe-3.0 EPSF-3.0") == extension_of(b"RIFF....WAVE") == "bin"


def test_image_open_is_called_only_by_the_helper():
    """Pillow is asked to open bytes in one place, with its formats list; any other ``Image.open``
    in the packages would be a new way for a download to reach every parser Pillow has."""
    calls = []
    for package in ("common", "pipeline", "stages", "trainer"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) in ("Image.open", "PIL.Image.open"):
                    formats = any(k.arg == "formats" for k in node.keywords)
                    calls.append((str(path.relative_to(REPO)), formats))
    assert calls == [("common/images.py", True)]
