"""Image filter: drop images by their size alone, from the columns download wrote; no decode.

Sizes are the ORIGINAL image's (``original_width`` / ``original_height``): after a resize every
image looks the same size, and a center crop hides the aspect ratio. Where a row lacks either
original side (or the columns are absent) the stored ``width`` / ``height`` pair stands in. Checks, first failing
one wins: missing_size (no positive size at all), image_too_small (shorter side < ``min_side``),
extreme_aspect_ratio (longer / shorter side > ``max_aspect_ratio``), too_many_pixels
(width * height > ``max_pixels``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pairsift.stages.base import Contract, PoolStage, Stage, StageConfig, with_reason

REASONS = ("missing_size", "image_too_small", "extreme_aspect_ratio", "too_many_pixels")


class ImageFilterConfig(StageConfig):
    min_side: int = Field(0, ge=0, description="shorter side of the original image, in pixels; 0 = any")
    max_aspect_ratio: float | None = Field(
        None, ge=1.0, description="longest / shortest side allowed, e.g. 3.0; None = any"
    )
    max_pixels: int | None = Field(None, gt=0, description="original width * height allowed; None = any")


class ImageFilter(Stage):
    name: ClassVar[str] = "image_filter"
    config_class: ClassVar[type[StageConfig]] = ImageFilterConfig
    cfg: ImageFilterConfig

    def contract(self) -> Contract:
        return Contract(reads=("width", "height"), optional=("original_width", "original_height"), reasons=REASONS)

    def __call__(self, shard: pa.Table) -> pa.Table:
        width, height = original_size(shard)
        codes = np.zeros(shard.num_rows, np.int8)  # 0 = kept, else 1 + index in REASONS
        checks = [~(np.isfinite(width) & np.isfinite(height) & (width > 0) & (height > 0))]
        shorter, longer = np.minimum(width, height), np.maximum(width, height)
        checks.append(shorter < self.cfg.min_side)
        # Cross-multiplied, so a zero side (already missing_size) cannot divide by zero.
        checks.append(longer > self.cfg.max_aspect_ratio * shorter if self.cfg.max_aspect_ratio else None)
        checks.append(width * height > self.cfg.max_pixels if self.cfg.max_pixels else None)
        for code, failed in enumerate(checks, start=1):
            if failed is not None:
                codes[(codes == 0) & failed] = code
        names = np.array((None, *REASONS), dtype=object)
        return with_reason(shard, names[codes].tolist())


def original_size(shard: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) per row: the original pair where both are known, else the stored pair (never
    one side of each); NaN where neither pair is known.

    float64 so width * height of a decompression-bomb header (65535 squared) cannot overflow."""
    stored = _pair(shard, "width", "height")
    original = _pair(shard, "original_width", "original_height")
    if stored is None and original is None:
        raise ValueError("image_filter needs width/height or original_width/original_height columns: "
                         "run download before it")
    if original is None:
        return stored  # type: ignore[return-value]
    if stored is None:
        return original
    known = ~(np.isnan(original[0]) | np.isnan(original[1]))
    return np.where(known, original[0], stored[0]), np.where(known, original[1], stored[1])


def _pair(shard: pa.Table, width: str, height: str) -> tuple[np.ndarray, np.ndarray] | None:
    if width not in shard.column_names or height not in shard.column_names:
        return None
    return _floats(shard.column(width)), _floats(shard.column(height))


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.float64()).to_numpy().astype(np.float64)  # nulls become NaN


class PlaceholderConfig(StageConfig):
    min_urls: int = Field(
        5, ge=2, description="the same image bytes under at least this many distinct URLs is a placeholder"
    )


class Placeholder(PoolStage):
    """Drop "image not available" placeholders: the same bytes served with status 200 under many URLs.

    Only the whole pool can tell (each URL alone looks like a fine small image), so this is a pool
    stage over the ``sha256`` download recorded: count distinct URLs per digest, then drop every row
    whose digest reached ``min_urls``. Rows without a digest are left alone."""

    name: ClassVar[str] = "placeholder"
    config_class: ClassVar[type[StageConfig]] = PlaceholderConfig
    cfg: PlaceholderConfig

    def contract(self) -> Contract:
        return Contract(reads=("sha256", "url"), reasons=("placeholder",))

    def partial(self, shard: pa.Table) -> pa.Table:
        if "sha256" not in shard.column_names:
            raise ValueError("placeholder needs the sha256 column the download stage writes (compute_sha256: true)")
        pairs = shard.select(["sha256", "url"]).filter(pc.is_valid(shard.column("sha256")))
        return pairs.group_by(["sha256", "url"]).aggregate([])

    def fit(self, partials: list[pa.Table]) -> dict[str, Any]:
        if not partials:
            return {"placeholders": pa.table({"sha256": pa.array([], pa.string()), "urls": pa.array([], pa.int64())})}
        pairs = pa.concat_tables(partials).group_by(["sha256", "url"]).aggregate([])
        per_digest = pairs.group_by("sha256").aggregate([("url", "count")]).rename_columns(["sha256", "urls"])
        frequent = per_digest.filter(pc.greater_equal(per_digest.column("urls"), self.cfg.min_urls))
        return {"placeholders": frequent, "n_placeholders": frequent.num_rows}

    def apply(self, shard: pa.Table, fitted: dict[str, Any], partial: pa.Table) -> pa.Table:
        digests = fitted["placeholders"].column("sha256")
        hit = pc.fill_null(pc.is_in(shard.column("sha256"), value_set=digests), False).to_pylist()
        return with_reason(shard, ["placeholder" if h else None for h in hit])
