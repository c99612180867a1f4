"""The run report's sample thumbnails: a few rows per drop reason and of the kept rows.

Samples are the smallest hashes of uid per group (same picks every time, streaming, no sort of the
pool), and thumbnails come only from the tars those samples live in. Rows dropped with a reason a
stage's contract declares private (a known-bad image) never have their image read, let alone shown.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

from pairsift.common.images import IMAGE_MEMBER_EXTENSIONS, open_image
from pairsift.common.tars import read_keys
from pairsift.pipeline.catalog import sql_files, sql_ident
from pairsift.pipeline.report_view import RunView, fmt_num
from pairsift.pipeline.run_dir import shard_of

SAMPLES_PER_GROUP = 8
THUMB_PX = 160
MAX_THUMB_PIXELS = 50_000_000  # ingest tars hold whatever the user gave us: no decompression bombs


def image_label(view: RunView) -> str | None:
    """The latest stage that stored images (download, or ingest of a webdataset input)."""
    for label in reversed(view.present):
        if view.run.image_tars(label):
            return label
    return None


def pick_samples(view: RunView, images_at: str) -> list[tuple[str | None, str | None, int, list[str]]]:
    """(dropped_at, reason, rows, picked uids) for each group of rows that have an image: rows dropped
    by a stage after ``images_at`` (they passed it, so they have one), and rows the last stage kept.

    Each group is one stage's own view, so no join of the pool is needed; min_by keeps the
    SAMPLES_PER_GROUP smallest uid hashes per group while streaming (no sort, same picks every time)."""
    pick = f"count(*), min_by(uid, hash(uid), {SAMPLES_PER_GROUP})"
    groups = []
    for label in view.present[view.present.index(images_at) + 1:]:
        for reason, rows, picked in view.rows(f"SELECT reason, {pick} FROM {sql_ident(label)} "
                                              "WHERE reason IS NOT NULL GROUP BY reason"):
            groups.append((label, reason, rows, picked))
    last = view.present[-1]
    alive = "" if last == "ingest" else " WHERE reason IS NULL"
    rows, picked = view.rows(f"SELECT {pick} FROM {sql_ident(last)}{alive}")[0]
    if rows:
        groups.append((None, None, rows, picked))
    return groups


def shard_of_uids(view: RunView, label: str, uids: list[str]) -> dict[str, int]:
    parts = sql_files(view.run.parts(label))
    rows = view.rows(f"SELECT uid, filename FROM read_parquet({parts}, filename=true) "
                     "WHERE uid IN (SELECT unnest($1::VARCHAR[]))", [uids])
    return {uid: shard_of(Path(filename)) for uid, filename in rows}


def read_images(tar_path: Path, wanted: set[str]) -> dict[str, bytes]:
    """Only the wanted images of one tar, by a scan of its headers: a 10,000-sample shard costs about
    60 ms, so sampled rows spread over a hundred shards stay cheap. A missing or damaged tar shows as
    "image not found" in the grid."""
    return read_keys(tar_path, wanted, IMAGE_MEMBER_EXTENSIONS)


def thumbnail(data: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """(a JPEG data URI of at most THUMB_PX a side, the image's own size); (None, None) when undecodable."""
    from PIL import Image

    try:
        with open_image(data) as image:
            size = image.size
            if image.width * image.height > MAX_THUMB_PIXELS:
                return None, size
            image.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a reduced scale
            small = image.convert("RGB")
            small.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), size


def thumbnail_uri(data: bytes) -> str | None:
    return thumbnail(data)[0]


def sample_details(view: RunView, uids: list[str]) -> dict[str, dict[str, Any]]:
    """The caption, and every declared score column a stage wrote, of a few uids: one filtered scan
    per view holding a wanted column (no join of the pool)."""
    details: dict[str, dict[str, Any]] = {uid: {} for uid in uids}
    scores = [c for label in view.specs for c in view.contract(label).scores]
    missing = list(dict.fromkeys(["caption", *scores]))
    for label in view.present:
        columns = [c for c in missing if c in view.columns(label)]
        if not columns:
            continue
        select = ", ".join(sql_ident(c) for c in columns)
        for uid, *values in view.rows(f"SELECT uid, {select} FROM {sql_ident(label)} "
                                      "WHERE uid IN (SELECT unnest($1::VARCHAR[]))", [uids]):
            details[uid].update(zip(columns, values))
        missing = [c for c in missing if c not in columns]
    return details


def sample_item(uid: str, info: dict[str, Any], image: bytes | None, withheld: str | None = None) -> dict[str, Any]:
    caption = info.get("caption") or ""
    short = caption if len(caption) <= 160 else caption[:157] + "…"
    src, size = thumbnail(image) if image else (None, None)
    detail = [f"{size[0]}×{size[1]}"] if size else []
    detail += [f"{column} {fmt_num(value)}" for column, value in info.items() if column != "caption" and value is not None]
    missing = withheld or ("image not found" if image is None else "image not decodable")
    return {"uid": uid, "caption": caption, "caption_short": short, "src": src, "missing": missing,
            "detail": " · ".join(detail)}


def group_order(view: RunView, group: tuple) -> tuple:
    stage, reason, rows, _ = group
    if reason is None:
        return (-1, 0)
    return (view.present.index(stage) if stage in view.present else len(view.present), -rows)


def samples_section(view: RunView) -> dict | None:
    images_at = image_label(view)
    if images_at is None:
        return None
    groups = sorted(pick_samples(view, images_at), key=lambda g: group_order(view, g))
    uids = [uid for group in groups for uid in group[3]]
    if not uids:
        return None
    private = view.private_reasons()
    # the images of private rows are never read: nothing of theirs can reach the page
    shown = [uid for _, reason, _, picked in groups if reason not in private for uid in picked]
    shards = shard_of_uids(view, images_at, shown) if shown else {}
    images: dict[str, bytes] = {}
    for shard in sorted(set(shards.values())):
        wanted = {uid for uid, s in shards.items() if s == shard}
        images.update(read_images(view.run.images(images_at, shard), wanted))
    details = sample_details(view, uids)
    out = []
    for stage, reason, rows, picked in groups:
        title = "kept" if reason is None else f"{reason} (dropped at {stage})"
        slug = re.sub(r"[^a-z0-9]+", "-", f"{stage or ''} {reason or 'kept'}".lower()).strip("-")
        withheld = f"image withheld ({reason})" if reason in private else None
        items = [sample_item(uid, details.get(uid, {}), None if withheld else images.get(uid), withheld)
                 for uid in sorted(picked, key=str)]
        out.append({"title": title, "slug": slug, "total": rows, "shown": len(items), "cards": items})
    return {"image_label": images_at, "per_group": SAMPLES_PER_GROUP, "groups": out}
