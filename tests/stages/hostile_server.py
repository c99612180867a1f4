"""A real HTTP server on 127.0.0.1 that misbehaves on purpose, for download tests and benchmarks.

Each endpoint is one way the web goes wrong (slow drips, endless or lying bodies, redirect games,
HTML served as JPEG, decompression bombs in the image or in Content-Encoding, headers too big to
parse, opt-out headers); ``ENDPOINTS`` documents the reason a
careful downloader should give for each. The images are drawn at start-up, so tests can compare
against ``server.images``. Use it as a context manager; it stops its handler threads on exit.

    with HostileServer() as server:
        fetch(server.url("/drip"), ...)
"""

from __future__ import annotations

import email.utils
import io
import random
import ssl
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw

# path -> the reason a careful downloader reports (None = success), given max_redirects=5, a deadline
# shorter than the drips (60 s), max_bytes between 2.5 MB (the 50,000² bomb must arrive) and 1 TB, and
# max_pixels below 2.5e9.
ENDPOINTS: dict[str, str | None] = {
    "/ok.jpg": None,
    "/ok.png": None,
    "/ok.webp": None,
    "/cmyk.jpg": None,
    "/animated.gif": None,
    "/exif-rotated.jpg": None,
    "/redirect-chain/2": None,
    "/404": "failed_to_download",
    "/status/500": "failed_to_download",
    "/drip": "timeout",
    "/drip-headers": "timeout",
    "/endless": "too_large",
    "/endless?chunked=1": "too_large",
    "/huge": "too_large",
    "/lie-short": "decode_error",  # Content-Length half the body: the image is cut in two
    "/lie-long": "failed_to_download",  # Content-Length twice the body, then the server hangs up
    "/redirect-loop": "failed_to_download",
    "/redirect-chain/9": "failed_to_download",  # more hops than max_redirects=5
    "/html-as-jpeg": "not_an_image",
    "/svg-as-jpeg": "not_an_image",
    "/empty.jpg": "not_an_image",
    "/truncated.jpg": "decode_error",
    "/corrupt.jpg": "decode_error",
    "/bomb.png": "image_too_large",
    "/bomb.jpg": "image_too_large",  # a 64x48 JPEG whose frame header says 50,000 x 50,000
    "/bomb.webp": "image_too_large",  # a 64x48 WebP in an extended (VP8X) canvas of 50,000 x 50,000
    "/16bit.png": None,  # 16 bits per channel: kept, and not saturated to white
    "/16bit-gray.png": None,
    # Content-Encoding bombs, sent although we ask for identity: never inflated, so the body is
    # a few MB of compressed bytes that are no image.
    "/gzip-bomb": "not_an_image",
    "/deflate-bomb": "not_an_image",
    "/gzip-bomb.jpg": "not_an_image",  # the same, labelled Content-Type: image/jpeg
    "/huge-header": "failed_to_download",  # one 1 MB header line
    "/many-headers": "failed_to_download",  # 5,000 header lines
    "/noai": "opt_out",
    "/tdm": "opt_out",
    # Formats Pillow has a parser for but pairsift does not decode: refused before that parser runs.
    "/eps-as-jpeg": "not_an_image",  # Pillow would hand it to Ghostscript
    "/psd-as-jpeg": "not_an_image",
    "/icns-as-jpeg": "not_an_image",
    "/pdf-as-jpeg": "not_an_image",
}

BOMB_SIDE = 50_000
ENCODING_BOMB_SIZE = 2 << 30  # what /gzip-bomb and /deflate-bomb inflate to: 2 GiB of zeros (~2 MB sent)
HUGE_HEADER_BYTES = 1 << 20
MANY_HEADERS = 5_000
EXIF_ORIENTATION = 0x0112


def draw_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: noise under random shapes, so JPEGs are of realistic size."""
    rng = random.Random(seed)
    image = Image.effect_noise((width, height), 40).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randrange(20, width // 2), y0 + rng.randrange(20, height // 2)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_bomb(side: int, rows_per_block: int = 0) -> bytes:
    """A valid greyscale PNG of ``side``×``side`` zero pixels: ~1 KB per 1M pixels on the wire,
    ``side``² bytes once decoded. Built from one compressed block repeated, so even the 50,000²
    (2.5 GB) bomb takes milliseconds to make."""
    row = b"\x00" * (side + 1)  # filter byte 0 + the pixels
    rows_per_block = max(1, rows_per_block or (1 << 22) // len(row))
    blocks, remainder = divmod(side, rows_per_block)
    if blocks < 2:
        stream = zlib.compress(row * side, 9)
    else:
        compressor = zlib.compressobj(9)
        block = row * rows_per_block
        head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # with the zlib header
        # After a full flush the compressor forgets its history, so the same input compresses to
        # the same bytes again: that steady-state block can be repeated instead of recompressed.
        repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
        tail = compressor.compress(row * remainder) + compressor.flush(zlib.Z_FINISH)
        adler = struct.pack(">I", (((side * (side + 1)) % 65521) << 16) | 1)  # adler32 of all zeros
        stream = head + repeated * (blocks - 1) + tail[:-4] + adler
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def encoding_bomb(size: int, wrapper: str = "gzip", block_size: int = 1 << 20) -> bytes:
    """A valid gzip (RFC 1952) or zlib (HTTP's "deflate", RFC 1950) stream of ``size`` zero bytes,
    about 1,000 times smaller. As in ``png_bomb``, one full-flushed compressed block is repeated
    instead of compressing gigabytes, and the checksums of all zeros are computed, not summed up,
    so the 2 GiB bombs take milliseconds to make."""
    if wrapper not in ("gzip", "deflate"):
        raise ValueError(f"wrapper must be gzip or deflate, not {wrapper!r}")
    block = bytes(min(block_size, max(size, 1)))
    blocks, remainder = divmod(size, len(block))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31 if wrapper == "gzip" else 15)
    if blocks == 0:
        stream = compressor.compress(bytes(remainder)) + compressor.flush(zlib.Z_FINISH)
    else:
        head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # with the header
        repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH) if blocks > 1 else b""
        tail = compressor.compress(bytes(remainder)) + compressor.flush(zlib.Z_FINISH)
        stream = head + repeated * (blocks - 1) + tail
    if wrapper == "deflate":
        return stream[:-4] + struct.pack(">I", ((size % 65521) << 16) | 1)  # adler32 of all zeros
    return stream[:-8] + struct.pack("<II", crc32_of_zeros(size), size & 0xFFFFFFFF)  # CRC-32, ISIZE


_CRC32_POLY = 0xEDB88320  # reflected, as zlib


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (zlib's multmodp; ``a`` is never 0 here)."""
    m, product = 1 << 31, 0
    while True:
        if a & m:
            product ^= b
            if a & (m - 1) == 0:
                return product
        m >>= 1
        b = (b >> 1) ^ _CRC32_POLY if b & 1 else b >> 1


def _crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's crc32_combine)."""
    shift, power, n = 1 << 31, 1 << 30, length2 * 8  # x^0; x^1; bits of B
    while n:
        if n & 1:
            shift = _multmodp(power, shift)
        power = _multmodp(power, power)
        n >>= 1
    return _multmodp(shift, crc1) ^ crc2


def crc32_of_zeros(size: int) -> int:
    """``zlib.crc32(bytes(size))`` without the bytes: built up from runs of 2^k zeros."""
    crc, run, run_crc = 0, 1, zlib.crc32(b"\0")
    while size:
        if size & 1:
            crc = _crc32_combine(crc, run_crc, run)
        run_crc, run = _crc32_combine(run_crc, run_crc, run), run * 2
        size >>= 1
    return crc


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _exif_rotated() -> bytes:
    """Stored 300×150, left half red, right half blue, with EXIF orientation 6 (rotate 90° clockwise
    to display): shown upright it is 150×300 with red on top."""
    image = Image.new("RGB", (300, 150), (0, 0, 255))
    ImageDraw.Draw(image).rectangle([0, 0, 149, 149], fill=(255, 0, 0))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (120, 90), colour) for colour in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG with its frame header (SOF0) rewritten to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (64, 48), "red"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _webp_declaring(width: int, height: int) -> bytes:
    """A real small lossy WebP wrapped in an extended-format (VP8X) canvas of ``width`` x ``height``."""
    simple = encode(Image.new("RGB", (64, 48), "red"), "WEBP")
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + simple[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def sixteen_bit_png(channels: int) -> bytes:
    """A 60x40 16-bit PNG: left half at 1/8 of full scale, right half at 1/2 (32 and 128 in 8 bits)."""
    import cv2
    import numpy as np

    pixels = np.full((40, 60, channels) if channels > 1 else (40, 60), 32768, np.uint16)
    pixels[:, :30] = 8192
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def _psd(width: int, height: int) -> bytes:
    """A minimal Photoshop file Pillow's PSD plugin opens: header, three empty sections, raw RGB."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + bytes(width * height * 3)


def build_images() -> dict[str, bytes]:
    photo = draw_photo(400, 320, seed=0)
    ok_jpg = encode(photo, "JPEG", quality=90)
    return {
        "ok.jpg": ok_jpg,
        "ok.png": encode(photo, "PNG"),
        "ok.webp": encode(photo, "WEBP", quality=90),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=90),
        "animated.gif": _animated_gif(),
        "exif-rotated.jpg": _exif_rotated(),
        "bomb.jpg": _jpeg_declaring(BOMB_SIDE, BOMB_SIDE),
        "bomb.webp": _webp_declaring(BOMB_SIDE, BOMB_SIDE),
        "16bit.png": sixteen_bit_png(3),
        "16bit-gray.png": sixteen_bit_png(1),
        "truncated.jpg": ok_jpg[: len(ok_jpg) * 6 // 10],
        # A valid JPEG header and tables, then garbage where the scan data should be.
        "corrupt.jpg": ok_jpg[:700] + bytes(random.Random(1).randrange(256) for _ in range(4000)),
        "html-as-jpeg": b"<!DOCTYPE html>\n<html><head><title>Not found</title></head>"
        b"<body><h1>Sorry, this page moved</h1></body></html>\n",
        "eps-as-jpeg": encode(Image.new("RGB", (8, 8), "red"), "EPS"),
        "psd-as-jpeg": _psd(8, 8),
        "icns-as-jpeg": encode(Image.new("RGB", (16, 16), "red"), "ICNS"),
        "pdf-as-jpeg": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        "svg-as-jpeg": b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg"'
        b' width="400" height="320"><rect width="400" height="320" fill="red"/></svg>\n',
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.started = time.monotonic()
        self.timed = False
        try:
            self._dispatch()
        finally:
            if not self.timed:
                self._time_it()

    def _time_it(self) -> None:
        # Logged as the response starts going out, so the log is complete before the client has
        # the answer, and the interval ends before the client can start its next request: the
        # overlaps counted are ones the client really had.
        if not self.timed:
            self.timed = True
            self.server.owner.record_timing(self.path, self.started, time.monotonic())

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.server.owner.record(self.path, self.headers)
        self.close_connection = True
        path = parts.path
        images = self.server.owner.images
        try:
            if path.lstrip("/") in images:
                content_type = {"png": "image/png", "webp": "image/webp", "gif": "image/gif"}
                kind = content_type.get(path.rsplit(".", 1)[-1], "image/jpeg")
                self._send(200, images[path.lstrip("/")], kind)
            elif path in _ROUTES:
                _ROUTES[path](self, query)
            elif path.startswith("/redirect-chain/"):
                hops = int(path.rsplit("/", 1)[1])
                if hops <= 0:
                    self._send(200, images["ok.jpg"], "image/jpeg")
                else:
                    self._redirect(f"/redirect-chain/{hops - 1}")
            elif path.startswith("/status/"):
                self._send(int(path.rsplit("/", 1)[1]), b"error page\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client gave up on us: that is the point of most endpoints

    # -- helpers --
    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self._time_it()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self._send(status, b"", "text/plain", {"Location": location})

    def _stopping(self) -> bool:
        return self.server.owner.stopping.is_set()

    # -- endpoints --
    def ep_404(self, query) -> None:
        self._send(404, b"<html>404</html>", "text/html")

    def ep_drip(self, query) -> None:
        body = self.server.owner.images["ok.jpg"]
        self._time_it()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        started = time.monotonic()
        for byte in body:
            if self._stopping() or time.monotonic() - started > self.server.owner.drip_total_s:
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(self.server.owner.drip_interval_s)

    def ep_drip_headers(self, query) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        started = time.monotonic()
        while not self._stopping() and time.monotonic() - started < self.server.owner.drip_total_s:
            self.wfile.write(b"a")
            self.wfile.flush()
            time.sleep(self.server.owner.drip_interval_s)

    def ep_endless(self, query) -> None:
        chunked = query.get("chunked") == ["1"]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        block = self.server.owner.images["ok.jpg"][:65536].ljust(65536, b"\x00")
        sent = 0
        while not self._stopping() and sent < (1 << 30):  # a ceiling so a broken client cannot hang a test
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            sent += len(block)

    def ep_huge(self, query) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        block = b"\x00" * 65536
        while not self._stopping():
            self.wfile.write(block)
            time.sleep(0.05)

    def ep_lie_short(self, query) -> None:
        body = self.server.owner.images["ok.jpg"]
        self._send(200, body, "image/jpeg", length=len(body) // 2)

    def ep_lie_long(self, query) -> None:
        body = self.server.owner.images["ok.jpg"]
        self._send(200, body, "image/jpeg", length=len(body) * 2)

    def ep_redirect_loop(self, query) -> None:
        self._redirect("/redirect-loop/b")

    def ep_redirect_loop_b(self, query) -> None:
        self._redirect("/redirect-loop")

    def ep_redirect_to(self, query) -> None:
        self._redirect(query["target"][0], int(query.get("code", ["302"])[0]))

    def ep_html(self, query) -> None:
        self._send(200, self.server.owner.images["html-as-jpeg"], "image/jpeg")

    def ep_svg(self, query) -> None:
        self._send(200, self.server.owner.images["svg-as-jpeg"], "image/jpeg")

    def ep_empty(self, query) -> None:
        self._send(200, b"", "image/jpeg")

    def ep_bomb(self, query) -> None:
        side = int(query.get("side", [str(BOMB_SIDE)])[0])
        self._send(200, self.server.owner.bomb(side), "image/png")

    def _encoding_bomb(self, wrapper: str, content_type: str) -> None:
        # Compressed although the request said "Accept-Encoding: identity": a client that inflates
        # it anyway holds ENCODING_BOMB_SIZE bytes.
        body = self.server.owner.encoding_bomb(wrapper)
        self._send(200, body, content_type, {"Content-Encoding": wrapper})

    def ep_gzip_bomb(self, query) -> None:
        self._encoding_bomb("gzip", "text/html")

    def ep_deflate_bomb(self, query) -> None:
        self._encoding_bomb("deflate", "text/html")

    def ep_gzip_bomb_jpg(self, query) -> None:
        self._encoding_bomb("gzip", "image/jpeg")

    def ep_huge_header(self, query) -> None:
        # One header line of HUGE_HEADER_BYTES, then a good image: http.client stops at 64 KiB.
        body = self.server.owner.images["ok.jpg"]
        self._time_it()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Filler: ")
        self.wfile.write(b"a" * HUGE_HEADER_BYTES)
        self.wfile.write(b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    def ep_many_headers(self, query) -> None:
        # MANY_HEADERS short header lines, then a good image: http.client stops after 100.
        body = self.server.owner.images["ok.jpg"]
        self._time_it()
        lines = b"".join(b"X-Filler-%d: %d\r\n" % (i, i) for i in range(MANY_HEADERS))
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + lines)
        self.wfile.write(b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    def ep_noai(self, query) -> None:
        self._send(200, self.server.owner.images["ok.jpg"], "image/jpeg", {"X-Robots-Tag": "noai"})

    def ep_robots(self, query) -> None:
        # /robots?tag=a&tag=b sends one X-Robots-Tag header per value.
        body = self.server.owner.images["ok.jpg"]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for value in query.get("tag", []):
            self.send_header("X-Robots-Tag", value)
        self.end_headers()
        self.wfile.write(body)

    def ep_tdm(self, query) -> None:
        self._send(200, self.server.owner.images["ok.jpg"], "image/jpeg", {"tdm-reservation": "1"})

    def ep_flaky(self, query) -> None:
        # /flaky?key=K&fail=N[&code=429][&after=S|after=date:S]: the first N requests for K get
        # `code` (503 by default), with a Retry-After of S seconds (or an HTTP-date S seconds ahead)
        # when `after` is given; later ones get the image.
        key, fail = query.get("key", [""])[0], int(query.get("fail", ["1"])[0])
        if self.server.owner.count(f"flaky:{key}") <= fail:
            headers = {}
            after = query.get("after", [None])[0]
            if after is not None and after.startswith("date:"):
                headers["Retry-After"] = email.utils.formatdate(time.time() + float(after[5:]), usegmt=True)
            elif after is not None:
                headers["Retry-After"] = after
            self._send(int(query.get("code", ["503"])[0]), b"busy\n", "text/plain", headers)
        else:
            self._send(200, self.server.owner.images["ok.jpg"], "image/jpeg")

    def ep_sleep(self, query) -> None:
        # /sleep?s=S: hold the request S seconds, then the image (makes concurrency visible).
        time.sleep(float(query.get("s", ["0.2"])[0]))
        self._send(200, self.server.owner.images["ok.jpg"], "image/jpeg")

    def ep_robots_txt(self, query) -> None:
        owner = self.server.owner
        if owner.robots_location:
            self._redirect(owner.robots_location)
        elif owner.robots_txt is None:
            self._send(404, b"not found\n", "text/plain")
        else:
            self._send(owner.robots_status, owner.robots_txt.encode(), "text/plain")

    def ep_optout_drip(self, query) -> None:
        # /optout-drip?tag=noai (or ?tdm=1): opt-out headers at once, then the body one byte per
        # drip interval. A client that honours the headers hangs up before the body; the server
        # notes how many body bytes it had sent when the connection was found closed.
        body = self.server.owner.images["ok.jpg"]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for value in query.get("tag", []):
            self.send_header("X-Robots-Tag", value)
        if "tdm" in query:
            self.send_header("tdm-reservation", query["tdm"][0])
        self.end_headers()
        self.wfile.flush()
        sent = 0
        try:
            for byte in body:
                if self._stopping():
                    return
                time.sleep(self.server.owner.drip_interval_s)
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            self.server.owner.closed_early.append((self.path, sent))
            raise


_ROUTES = {
    "/404": _Handler.ep_404,
    "/drip": _Handler.ep_drip,
    "/drip-headers": _Handler.ep_drip_headers,
    "/endless": _Handler.ep_endless,
    "/huge": _Handler.ep_huge,
    "/lie-short": _Handler.ep_lie_short,
    "/lie-long": _Handler.ep_lie_long,
    "/redirect-loop": _Handler.ep_redirect_loop,
    "/redirect-loop/b": _Handler.ep_redirect_loop_b,
    "/redirect-to": _Handler.ep_redirect_to,
    "/html-as-jpeg": _Handler.ep_html,
    "/svg-as-jpeg": _Handler.ep_svg,
    "/empty.jpg": _Handler.ep_empty,
    "/bomb.png": _Handler.ep_bomb,
    "/gzip-bomb": _Handler.ep_gzip_bomb,
    "/deflate-bomb": _Handler.ep_deflate_bomb,
    "/gzip-bomb.jpg": _Handler.ep_gzip_bomb_jpg,
    "/huge-header": _Handler.ep_huge_header,
    "/many-headers": _Handler.ep_many_headers,
    "/noai": _Handler.ep_noai,
    "/robots": _Handler.ep_robots,
    "/tdm": _Handler.ep_tdm,
    "/flaky": _Handler.ep_flaky,
    "/sleep": _Handler.ep_sleep,
    "/robots.txt": _Handler.ep_robots_txt,
    "/optout-drip": _Handler.ep_optout_drip,
}


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops SYNs under a burst of connections and the client
    # retries a second later, which would look like a slow server. Misbehaviour here is on purpose only.
    request_queue_size = 256
    daemon_threads = True
    block_on_close = False
    owner: HostileServer


class HostileServer:
    """The server and its state: images, request log, and the knobs of the slow endpoints."""

    def __init__(
        self,
        drip_interval_s: float = 0.5,
        drip_total_s: float = 60.0,
        host: str = "127.0.0.1",
        tls: tuple[str, str] | None = None,
    ):
        """``tls``: (certificate chain file, key file) to serve https instead of http."""
        if not host.startswith("127."):
            raise ValueError("the hostile server binds to loopback only")
        self.host = host
        self.tls = tls
        self.drip_interval_s = drip_interval_s
        self.drip_total_s = drip_total_s
        self.images = build_images()
        self.stopping = threading.Event()
        self.requests: list[str] = []  # every request's path, in arrival order
        self.request_headers: list[dict[str, str]] = []  # and its headers (lower-cased names)
        # (path, started, ended) per finished request, server-side time.monotonic(): request rates
        # and peak concurrency as the server saw them.
        self.timings: list[tuple[str, float, float]] = []
        self.closed_early: list[tuple[str, int]] = []  # (path, body bytes sent) for /optout-drip
        self.robots_txt: str | None = None  # served at /robots.txt (None: 404)
        self.robots_status = 200
        self.robots_location: str | None = None  # redirect /robots.txt here instead
        self._counts: dict[str, int] = {}
        self._bombs: dict[int, bytes] = {}
        self._encoding_bombs = {w: encoding_bomb(ENCODING_BOMB_SIZE, w) for w in ("gzip", "deflate")}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._server = _Server((self.host, 0), _Handler)
        self._server.owner = self
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hostile-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()  # long handlers (drip, endless, huge) watch this and return
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._server is not None, "use HostileServer as a context manager"
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{path}"

    def record(self, path: str, headers) -> None:
        with self._lock:
            self.requests.append(path)
            self.request_headers.append({k.lower(): v for k, v in headers.items()})

    def record_timing(self, path: str, started: float, ended: float) -> None:
        with self._lock:
            self.timings.append((path, started, ended))

    def count(self, key: str) -> int:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            return self._counts[key]

    def bomb(self, side: int) -> bytes:
        with self._lock:
            if side not in self._bombs:
                self._bombs[side] = png_bomb(side)
            return self._bombs[side]

    def encoding_bomb(self, wrapper: str) -> bytes:
        """The /gzip-bomb or /deflate-bomb body (built at start-up)."""
        return self._encoding_bombs[wrapper]
