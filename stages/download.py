"""The download stage: fetch every row's ``url``, check it is a sane image, resize and re-encode it.

Fetching is ``stages.fetch`` (address policy, deadline, byte cap, opt-outs); resizing and encoding
is img2dataset's ``Resizer``, so resize modes and output bytes match what img2dataset users know.
Between the two sits a cheap inspection with PIL's lazy ``Image.open``, which reads only the
header: markup or unknown bytes served as an image are ``not_an_image``, and a declared size above
``max_pixels`` is ``image_too_large`` before a single pixel is decoded (a 50,000² PNG bomb is a few
MB on the wire and 2.5 GB in memory). Images with an EXIF rotation, or in formats OpenCV cannot
read, are made upright/readable with PIL first (img2dataset ignores EXIF orientation).

Like img2dataset, fetches run on a thread pool and decode/resize runs on the calling thread, with
at most two fetched bodies per thread waiting; the Resizer redirects the process's stdout/stderr
while it decodes, which is only safe from one thread.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from typing import Any, ClassVar, Literal

import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field, model_validator

from stages.base import IMAGE, Resources, Stage, StageConfig, with_reason
from stages.fetch import (
    DEFAULT_USER_AGENT,
    FAILED,
    CachingResolver,
    FetchPolicy,
    FetchResult,
    Resolver,
    fetch,
)

DECODE_ERROR = "decode_error"
NOT_AN_IMAGE = "not_an_image"
IMAGE_TOO_LARGE = "image_too_large"
EXIF_ORIENTATION = 0x0112
# Formats OpenCV's imdecode reads correctly; anything else PIL identifies goes through PIL first.
CV2_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM"})
ORIENTED_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "TIFF"})  # where EXIF sits in the header


class DownloadConfig(StageConfig):
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "border"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)  # for png: the zlib compression level, 0-9
    retries: int = Field(0, ge=0)
    timeout_s: float = Field(10.0, gt=0)  # one socket operation
    deadline_s: float = Field(30.0, gt=0)  # the whole request, redirects included
    max_bytes: int = Field(20_000_000, gt=0)
    max_pixels: int = Field(50_000_000, gt=0)
    thread_count: int = Field(32, ge=1, le=1024)
    user_agent_token: str | None = Field(None, pattern=r"^[A-Za-z0-9._+-]+$")
    respect_opt_out: bool = True
    allow_loopback: bool = False  # loopback servers (tests, `pairsift serve`); never other private ranges
    max_redirects: int = Field(5, ge=0)
    compute_sha256: bool = True

    @model_validator(mode="after")
    def _png_quality_is_a_compression_level(self) -> DownloadConfig:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError(
                f"download: encode_quality for png is a compression level 0-9, got {self.encode_quality}"
            )
        return self

    def fetch_policy(self) -> FetchPolicy:
        agent = DEFAULT_USER_AGENT
        if self.user_agent_token:
            agent += f" (compatible; {self.user_agent_token})"
        return FetchPolicy(
            timeout_s=self.timeout_s,
            deadline_s=self.deadline_s,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            retries=self.retries,
            allow_loopback=self.allow_loopback,
            respect_opt_out=self.respect_opt_out,
            user_agent=agent,
            user_agent_token=self.user_agent_token,
        )


@dataclass
class RowResult:
    reason: str | None = None
    error: str | None = None
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None

    @property
    def status(self) -> str:
        return "success" if self.reason is None else "failed"


class Rejected(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


COLUMNS: dict[str, pa.DataType] = {
    "status": pa.string(),
    "error": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "sha256": pa.string(),
    IMAGE: pa.binary(),
}


class Download(Stage):
    name: ClassVar[str] = "download"
    config_class: ClassVar[type[StageConfig]] = DownloadConfig
    stateful: ClassVar[bool] = False
    needs_images: ClassVar[bool] = False
    cfg: DownloadConfig

    def __init__(self, cfg: DownloadConfig, resolver: Resolver | None = None):
        """``resolver`` maps a host name to addresses; tests inject one, the default is the system's
        ``getaddrinfo`` behind a per-worker cache."""
        super().__init__(cfg)
        self._resolver = resolver
        self._resizer: Any = None

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1)  # the threads mostly wait on the network; decoding is one core

    def setup(self) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations calls home on import
        from img2dataset.resizer import Resizer

        # PIL's own bomb guard, as a second line behind the header check in inspect_image.
        Image.MAX_IMAGE_PIXELS = self.cfg.max_pixels
        self._resizer = Resizer(
            image_size=self.cfg.image_size,
            resize_mode=self.cfg.resize_mode,
            resize_only_if_bigger=self.cfg.resize_only_if_bigger,
            encode_format=self.cfg.encode_format,
            encode_quality=self.cfg.encode_quality,
        )
        if self._resolver is None:
            self._resolver = CachingResolver()

    def __call__(self, shard: pa.Table) -> pa.Table:
        if self._resizer is None:
            self.setup()
        if "url" not in shard.column_names:
            raise ValueError(
                f"download: the shard has no 'url' column (columns: {', '.join(shard.column_names)})"
            )
        rows = self.download_all(shard.column("url").to_pylist())
        for name, kind in COLUMNS.items():
            values = [r.status if name == "status" else getattr(r, name) for r in rows]
            shard = _put_column(shard, name, pa.array(values, kind))
        return with_reason(shard, [r.reason for r in rows])

    def download_all(self, urls: list[Any]) -> list[RowResult]:
        """One RowResult per url, in order. Fetches run on ``thread_count`` threads; at most two
        fetched bodies per thread wait for the (single-threaded) decode, which bounds memory."""
        results: list[RowResult | None] = [None] * len(urls)
        if not urls:
            return []
        slots = threading.Semaphore(2 * self.cfg.thread_count)
        policy = self.cfg.fetch_policy()

        def feed():
            for index in range(len(urls)):
                slots.acquire()
                yield index

        def fetch_row(index: int) -> tuple[int, FetchResult, str | None]:
            try:
                fetched = fetch(urls[index], policy, self._resolver)
            except Exception as exc:  # noqa: BLE001 - a bug for one url must not cost the shard
                fetched = FetchResult(str(urls[index]), reason=FAILED, error=f"{type(exc).__name__}: {exc}")
            digest = None
            if fetched.ok and self.cfg.compute_sha256:
                digest = hashlib.sha256(fetched.data).hexdigest()  # releases the GIL: hash here, not below
            return index, fetched, digest

        with ThreadPool(min(self.cfg.thread_count, len(urls))) as pool:
            for index, fetched, digest in pool.imap_unordered(fetch_row, feed()):
                try:
                    results[index] = self.finish(fetched, digest)
                except Exception as exc:  # noqa: BLE001 - per-row failures are values
                    results[index] = RowResult(DECODE_ERROR, f"{type(exc).__name__}: {exc}")
                finally:
                    slots.release()
        return [r if r is not None else RowResult(FAILED, "lost result") for r in results]

    def finish(self, fetched: FetchResult, digest: str | None) -> RowResult:
        """Turn fetched bytes into the stored image, or the reason there is none."""
        if not fetched.ok or fetched.data is None:
            return RowResult(fetched.reason or FAILED, fetched.error)
        try:
            prepared = inspect_image(fetched.data, self.cfg.max_pixels)
        except Rejected as rejected:
            return RowResult(rejected.reason, str(rejected), sha256=digest)
        image, width, height, original_width, original_height, error = self._resizer(io.BytesIO(prepared))
        if error is not None:
            return RowResult(DECODE_ERROR, error, sha256=digest)
        return RowResult(None, None, image, width, height, original_width, original_height, digest)


def inspect_image(data: bytes, max_pixels: int) -> bytes:
    """Check ``data`` from its header alone and return bytes OpenCV can decode the right way up.

    Raises Rejected: not_an_image (markup, unknown bytes), image_too_large (declared pixels above
    ``max_pixels``, checked before decoding), decode_error (a broken header or body)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we say it ourselves, below
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header, decodes nothing
        except Image.DecompressionBombError as exc:
            raise Rejected(IMAGE_TOO_LARGE, str(exc)) from None
        except UnidentifiedImageError:
            raise Rejected(NOT_AN_IMAGE, f"not an image: {describe_bytes(data)}") from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for broken headers
            raise Rejected(DECODE_ERROR, f"broken image header: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(IMAGE_TOO_LARGE, f"{width}x{height} = {width * height} pixels is above {max_pixels}")
    if width == 0 or height == 0:
        raise Rejected(DECODE_ERROR, f"empty image {width}x{height}")
    orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format in ORIENTED_FORMATS else 1
    if orientation in range(2, 9) or image.format not in CV2_FORMATS:
        return _upright_png(image)
    return data


def _upright_png(image: Image.Image) -> bytes:
    """Decode with PIL, apply the EXIF orientation, re-encode losslessly (fast PNG) for the Resizer."""
    try:
        image = ImageOps.exif_transpose(image)
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


def _put_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:  # a re-run on its own output replaces, never duplicates
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
