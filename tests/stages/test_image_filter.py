"""Image filter: size rules on the original dimensions download recorded; no image is decoded."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from pydantic import ValidationError

from pairsift.stages import stage_class
from pairsift.stages.base import with_reason
from pairsift.stages.image_filter import ImageFilter, ImageFilterConfig

INT32 = pa.int32()
STRICT = {"min_side": 64, "max_aspect_ratio": 3.0, "max_pixels": 4_000_000}


def sized(originals: list[tuple], stored: list[tuple] | None = None, kind: pa.DataType = INT32) -> pa.Table:
    """A download-like table: (original_width, original_height) and the resized (width, height)."""
    stored = stored or [(256, 256)] * len(originals)
    return pa.table({
        "uid": [f"{i:032x}" for i in range(len(originals))],
        "original_width": pa.array([w for w, _ in originals], kind),
        "original_height": pa.array([h for _, h in originals], kind),
        "width": pa.array([w for w, _ in stored], kind),
        "height": pa.array([h for _, h in stored], kind),
    })


def reasons(table: pa.Table, **cfg) -> list[str | None]:
    return ImageFilter(ImageFilterConfig(**cfg))(table).column("reason").to_pylist()


@pytest.mark.parametrize(("original", "expected"), [
    ((640, 480), None),
    ((64, 64), None),  # limits are inclusive
    ((192, 64), None),  # exactly 3:1
    ((2000, 2000), None),  # exactly 4,000,000 pixels
    ((63, 500), "image_too_small"),
    ((500, 63), "image_too_small"),
    ((20, 200), "image_too_small"),  # also 10:1, but too small is checked first
    ((193, 64), "extreme_aspect_ratio"),
    ((64, 1000), "extreme_aspect_ratio"),
    ((30_000, 100), "extreme_aspect_ratio"),  # also too many pixels: aspect ratio comes first
    ((2001, 2000), "too_many_pixels"),
    ((65_535, 65_535), "too_many_pixels"),  # a decompression bomb's header
    ((0, 480), "missing_size"),
    ((640, -1), "missing_size"),
])
def test_each_reason(original, expected):
    assert reasons(sized([original]), **STRICT) == [expected]


def test_original_size_decides_not_the_resized_one():
    # Download resized every image to 256x256 (center crop): only the originals tell them apart.
    table = sized([(40, 40), (1024, 128), (640, 480)], stored=[(256, 256)] * 3)
    assert reasons(table, **STRICT) == ["image_too_small", "extreme_aspect_ratio", None]


def test_falls_back_to_stored_size_per_row_as_a_pair():
    table = sized([(None, None), (None, 480), (40, None), (640, 480)],
                  stored=[(32, 32), (600, 100), (640, 480), (10, 10)])
    # never mixes one original side with one stored side
    assert reasons(table, **STRICT) == ["image_too_small", "extreme_aspect_ratio", None, None]


def test_falls_back_when_originals_are_absent():
    table = pa.table({"width": [32, 640, 1000], "height": [32, 480, 100]})
    assert reasons(table, **STRICT) == ["image_too_small", None, "extreme_aspect_ratio"]
    originals_only = pa.table({"original_width": [32, 640], "original_height": [32, 480]})
    assert reasons(originals_only, **STRICT) == ["image_too_small", None]


def test_rows_without_any_size():
    table = sized([(None, None), (None, None), (640, 480)], stored=[(None, None), (256, None), (256, 256)])
    assert reasons(table) == ["missing_size", "missing_size", None]  # even with every check off
    floats = pa.table({"width": [math.nan, 640.0, math.inf], "height": [480.0, 480.0, 480.0]})
    assert reasons(floats) == ["missing_size", None, "missing_size"]


def test_no_size_columns_is_one_clear_error():
    with pytest.raises(ValueError, match="run download before it"):
        ImageFilter(ImageFilterConfig())(pa.table({"uid": ["a"], "caption": ["a dog"]}))


def test_large_sizes_do_not_overflow():
    # 100,000 x 100,000 overflows int32 if multiplied in the column's type.
    table = sized([(100_000, 100_000), (46_341, 46_341)], kind=pa.int32())
    assert reasons(table, max_pixels=2_000_000_000) == ["too_many_pixels", "too_many_pixels"]
    assert reasons(sized([(100_000, 100_000)], kind=pa.int64()), max_pixels=10**10) == [None]


def test_defaults_keep_every_sized_image():
    table = sized([(1, 1), (1, 10_000), (65_535, 65_535)])
    assert reasons(table) == [None, None, None]


def test_rows_columns_and_earlier_reasons_are_kept():
    table = with_reason(sized([(640, 480), (10, 10), (640, 480), (10, 10)]), [None, None, "timeout", "timeout"])
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=1))
    out = ImageFilter(ImageFilterConfig(min_side=64))(chunked)
    assert out.num_rows == 4
    assert out.drop_columns(["reason"]).equals(table.drop_columns(["reason"]))
    assert out.column_names == table.column_names
    assert out.column("reason").to_pylist() == [None, "image_too_small", "timeout", "timeout"]
    empty = ImageFilter(ImageFilterConfig(min_side=64))(table.slice(0, 0))
    assert empty.num_rows == 0 and "reason" in empty.column_names


def test_config_validation():
    with pytest.raises(ValidationError, match="extra"):
        ImageFilterConfig(min_size=64)
    with pytest.raises(ValidationError):
        ImageFilterConfig(min_side="large")
    with pytest.raises(ValidationError):
        ImageFilterConfig(min_side=-1)
    with pytest.raises(ValidationError):
        ImageFilterConfig(max_aspect_ratio=0.5)  # a ratio is longer / shorter: never below 1
    with pytest.raises(ValidationError):
        ImageFilterConfig(max_pixels=0)


def test_registry_and_contract():
    assert stage_class("image_filter") is ImageFilter
    assert ImageFilter.config_class is ImageFilterConfig
    assert "image" not in ImageFilter(ImageFilterConfig()).contract().reads  # sizes come from columns: no bytes shipped


# ---- placeholders: the same bytes under many URLs, across shards ----------------------------------

def test_placeholder_needs_the_whole_pool():
    from pairsift.stages.image_filter import Placeholder, PlaceholderConfig

    stage = Placeholder(PlaceholderConfig(min_urls=3))
    # "not available" image under 3 URLs spread over two shards; a popular image re-posted under one URL
    # twice; an ordinary image once; a failed download (no digest).
    shard_a = pa.table({"uid": ["a1", "a2", "a3", "a4"], "url": ["u1", "u2", "u9", "u9"],
                        "sha256": ["NA", "NA", "POP", "POP"]})
    shard_b = pa.table({"uid": ["b1", "b2", "b3"], "url": ["u3", "u4", "u5"], "sha256": ["NA", "OK", None]})
    partials = [stage.partial(shard_a), stage.partial(shard_b)]
    fitted = stage.fit(partials)
    assert fitted["placeholders"].column("sha256").to_pylist() == ["NA"]
    out_a = stage.apply(shard_a, fitted, partials[0]).column("reason").to_pylist()
    out_b = stage.apply(shard_b, fitted, partials[1]).column("reason").to_pylist()
    assert out_a == ["placeholder", "placeholder", None, None]  # same URL twice is not a placeholder
    assert out_b == ["placeholder", None, None]
    # per shard, no digest reaches 3 URLs: only the pool-wide fit can see it
    assert all(r is None for r in stage(shard_a).column("reason").to_pylist())
