"""Image fingerprints (``image_hashes``), for duplicate finding and known-bad hash lists.

Per image: ``md5`` of the bytes (hash lists are often MD5; download already records ``sha256``),
``pixel_sha256`` of the decoded RGB pixels (re-encodes of the same pixels match exactly), and the
perceptual hashes ``phash`` (64-bit DCT hash from ``imagehash``, BSD) and ``pdq`` (Meta's 256-bit
PDQ, from ``pdqhash``, MIT) with ``pdq_quality`` (0-100; PDQ's authors advise ignoring hashes below
50: flat images). Perceptual hashes are compared by Hamming distance. Rows whose bytes do not decode
get ``decode_error``, rows without an image ``no_image``.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from pairsift.common.images import open_image
from pairsift.stages.base import IMAGE, Contract, ScoreSpec, Stage, StageConfig, with_reason

NO_IMAGE, DECODE_ERROR = "no_image", "decode_error"


class ImageHashesConfig(StageConfig):
    perceptual: list[str] = Field(default_factory=lambda: ["phash", "pdq"], description="phash and/or pdq")
    max_side: int = Field(512, ge=32, description="images are shrunk to this longer side before hashing")


class ImageHashes(Stage):
    name: ClassVar[str] = "image_hashes"
    config_class: ClassVar[type[StageConfig]] = ImageHashesConfig
    cfg: ImageHashesConfig

    def contract(self) -> Contract:
        writes = {"md5": pa.string(), "pixel_sha256": pa.string()}
        if "phash" in self.cfg.perceptual:
            writes["phash"] = pa.uint64()
        if "pdq" in self.cfg.perceptual:
            writes |= {"pdq": pa.binary(32), "pdq_quality": pa.int8()}
        scores = {"pdq_quality": ScoreSpec("PDQ hash quality (0-100; low: a flat image)")} if "pdq" in writes else {}
        return Contract(reads=(IMAGE,), writes=writes, reasons=(NO_IMAGE, DECODE_ERROR), bulky=("pdq",),
                        scores=scores)

    def __call__(self, shard: pa.Table) -> pa.Table:
        rows = [self.hashes(data) if data else None for data in shard.column(IMAGE).to_pylist()]
        reasons = [None if row else (DECODE_ERROR if data else NO_IMAGE)
                   for row, data in zip(rows, shard.column(IMAGE).to_pylist())]
        for name, kind in self.contract().writes.items():
            shard = shard.append_column(name, pa.array([row[name] if row else None for row in rows], kind))
        return with_reason(shard, reasons)

    def hashes(self, data: bytes) -> dict | None:
        try:
            with open_image(data) as opened:
                image = opened.convert("RGB")
        except Exception:  # noqa: BLE001 - any undecodable image is a per-row reason
            return None
        out: dict = {"md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                     "pixel_sha256": pixel_sha256(image)}
        if max(image.size) > self.cfg.max_side:
            image.thumbnail((self.cfg.max_side, self.cfg.max_side))
        if "phash" in self.cfg.perceptual:
            import imagehash

            out["phash"] = int(str(imagehash.phash(image)), 16)
        if "pdq" in self.cfg.perceptual:
            import pdqhash

            bits, quality = pdqhash.compute(np.asarray(image))
            out["pdq"], out["pdq_quality"] = np.packbits(bits.astype(np.uint8)).tobytes(), int(quality)
        return out


def pixel_sha256(image) -> str:
    """sha256 over the size and the RGB pixels: the same picture saved as PNG or BMP matches."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def hamming(a: int | bytes, b: int | bytes) -> int:
    """Bits that differ between two perceptual hashes (64-bit ints or equal-length bytes)."""
    if isinstance(a, int) and isinstance(b, int):
        return (a ^ b).bit_count()
    assert isinstance(a, bytes) and isinstance(b, bytes)
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())
