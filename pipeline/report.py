"""The run report: one self-contained HTML page showing where a run's data went (``pairsift report RUN``).

``write_report(run_dir)`` writes ``<run>/report/index.html``: the funnel, CLIP-score histograms with
their thresholds, MetaCLIP entry counts before and after balancing, caption lengths before and after
rewriting or enrichment, thumbnails per drop reason and of kept samples, per-stage time, throughput and
resources, failed shards, and the demo's model comparison when ``report/comparison.json`` exists. A
section appears only when its data does. Numbers are DuckDB aggregates over the parquet parts; samples
are the smallest hashes of uid per group (same picks every time, streaming, no sort of the pool), and
thumbnails come only from the tars those samples live in (a 2M-row catalog reports in about 7 s on 2 cores).
Plots (matplotlib) and thumbnails are embedded as data URIs, and a Content-Security-Policy forbids every
fetch and every script: captions are untrusted web text, escaped by the template's autoescaping.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pairsift.common.images import IMAGE_MEMBER_EXTENSIONS, open_image
from pairsift.common.storage import as_path
from pairsift.common.tars import read_keys
from pairsift.pipeline.catalog import funnel, open_catalog, sql_files, sql_ident, stage_labels
from pairsift.pipeline.run_dir import RunDir, is_partial, shard_of, write_atomic

TEMPLATE = Path(__file__).with_name("report_template.html")
SAMPLES_PER_GROUP = 8
THUMB_PX = 160
MAX_THUMB_PIXELS = 50_000_000  # ingest tars hold whatever the user gave us: no decompression bombs
HEAD_ROWS = 25
EXAMPLES = 6
HIST_BINS = 50
MAX_WORDS = 60  # caption-length histograms put longer captions in a last "60+" bin
MAX_CURVE_POINTS = 4000  # entry-count curves of 500k entries are drawn from log-spaced ranks
KEPT_COLOUR = "#59a14f"
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#a0cbe8", "#ffbe7d", "#ff9d9a", "#86bcb6", "#f1ce63", "#d4a6c8", "#d7b5a6", "#79706e"]


# --- what every section reads ----------------------------------------------------------------

@dataclass
class RunView:
    run: RunDir
    meta: dict[str, Any]
    con: duckdb.DuckDBPyConnection
    present: list[str]  # labels with parts on disk, pipeline order, "ingest" first
    specs: dict[str, dict[str, Any]]  # label -> the stage's resolved config (with "stage")

    def kind(self, label: str) -> str | None:
        return self.specs.get(label, {}).get("stage")

    def labels_of(self, kind: str) -> list[str]:
        return [label for label in self.present if self.kind(label) == kind]

    def columns(self, label: str) -> set[str]:
        return {row[0] for row in self.con.execute(f"DESCRIBE {sql_ident(label)}").fetchall()}

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def fit_values(self, label: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.run.fit(label).read_text()).get("values", {}))
        except (OSError, ValueError, AttributeError):
            return {}


def open_view(run_dir: Path) -> RunView:
    run = RunDir(run_dir)
    meta = run.read_run_json()
    con = open_catalog(run_dir)
    con.execute("SET enable_progress_bar = false")  # a report is not an interactive shell
    # words(x): caption length in words, used by the caption sections
    con.execute(r"CREATE TEMP MACRO words(x) AS length(regexp_split_to_array(trim(x), '\s+'))")
    specs = {s["label"]: s for s in meta.get("config", {}).get("stages", [])}
    return RunView(run, meta, con, stage_labels(run), specs)


# --- formatting and charts -------------------------------------------------------------------

def fmt_num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if value != value:  # NaN
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def fmt_pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def fmt_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def png_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def new_axes(width: float, height: float):
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x" if width > height * 3 else "y", alpha=0.25)
    return fig, ax


# --- funnel ----------------------------------------------------------------------------------

def reason_colours(stages) -> dict[str, str]:
    colours: dict[str, str] = {}
    for stage in stages:
        for reason in stage.dropped:
            colours.setdefault(reason, PALETTE[len(colours) % len(PALETTE)])
    return colours


def funnel_chart(stages, colours: dict[str, str]) -> str:
    fig, ax = new_axes(9.5, 0.45 * len(stages) + 1.0)
    for y, stage in enumerate(stages):
        ax.barh(y, stage.kept, color=KEPT_COLOUR, height=0.6)
        left = stage.kept
        for reason, n in sorted(stage.dropped.items(), key=lambda kv: -kv[1]):
            ax.barh(y, n, left=left, color=colours[reason], height=0.6)
            left += n
        ax.text(stage.rows_in, y, f"  {stage.kept:,} of {stage.rows_in:,} kept", va="center", fontsize=9)
    ax.set_yticks(range(len(stages)), [s.label for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_xlim(0, max(s.rows_in for s in stages) * 1.28 or 1)
    handles = [Patch(color=KEPT_COLOUR, label="kept")] + [Patch(color=c, label=r) for r, c in colours.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return png_uri(fig)


def funnel_section(view: RunView) -> dict | None:
    stages = [s for s in funnel(view.run.root) if s.rows_in or s.label == "ingest"]
    if not stages:
        return None
    colours = reason_colours(stages)
    rows = []
    for stage in stages:
        dropped = [(r, n, colours[r]) for r, n in sorted(stage.dropped.items(), key=lambda kv: -kv[1])]
        shards = []
        if stage.failed_shards:
            shards.append(f"{len(stage.failed_shards)} failed")
        if stage.pending_shards:
            shards.append(f"{stage.pending_shards} pending")
        rows.append({"label": stage.label, "stage": view.kind(stage.label), "rows_in": stage.rows_in,
                     "kept": stage.kept, "kept_pct": fmt_pct(stage.kept, stage.rows_in), "dropped": dropped,
                     "shards": ", ".join(shards) or "all done"})
    return {"chart": funnel_chart(stages, colours), "rows": rows}


# --- CLIP score --------------------------------------------------------------------------------

def histogram(view: RunView, source: str, expr: str, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of ``expr`` in ``bins`` equal bins over [lo, hi], computed by DuckDB."""
    width = (hi - lo) / bins or 1.0
    counts = np.zeros(bins, dtype=np.int64)
    sql = (f"SELECT least(greatest(floor(({expr} - {lo!r}) / {width!r}), 0), {bins - 1})::INT AS b, count(*) "
           f"FROM {source} WHERE isfinite({expr}) GROUP BY b")
    for b, n in view.rows(sql):
        counts[b] = n
    return counts


def filter_after(view: RunView, score_label: str) -> str | None:
    """The clip_filter that reads this clip_score's column: the next one before another clip_score."""
    labels = list(view.specs)
    for label in labels[labels.index(score_label) + 1:]:
        if view.kind(label) == "clip_score":
            return None
        if view.kind(label) == "clip_filter":
            return label if label in view.present else None
    return None


def clip_chart(edges: np.ndarray, counts: np.ndarray, threshold: float | None) -> str:
    fig, ax = new_axes(9.5, 3.2)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.zeros(len(counts), bool) if threshold is None else centres < threshold
    width = edges[1] - edges[0]
    ax.bar(centres[~below], counts[~below], width=width * 0.95, color="#4e79a7", label="at or above threshold")
    if below.any():
        ax.bar(centres[below], counts[below], width=width * 0.95, color="#bab0ac", label="below threshold")
    if threshold is not None:
        ax.axvline(threshold, color="#e15759", linewidth=2, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("clip_score (cosine similarity of image and caption)")
    ax.set_ylabel("pairs")
    ax.legend(frameon=False, fontsize=9)
    return png_uri(fig)


def clip_block(view: RunView, label: str) -> dict | None:
    if "clip_score" not in view.columns(label):
        return None
    source = sql_ident(label)
    n, mean, median, lo, hi = view.rows(
        f"SELECT count(*), avg(clip_score), median(clip_score), min(clip_score), max(clip_score) "
        f"FROM {source} WHERE isfinite(clip_score)")[0]
    if not n:
        return None
    block: dict[str, Any] = {"label": label, "n": n, "mean": f"{mean:.4f}", "median": f"{median:.4f}",
                             "filter": None, "threshold": None}
    threshold = None
    filter_label = filter_after(view, label)
    if filter_label is not None:
        threshold = view.fit_values(filter_label).get("threshold")
        spec = view.specs[filter_label]
        kept, dropped = view.rows(f"SELECT count(*) FILTER (WHERE reason IS NULL), "
                                  f"count(*) FILTER (WHERE reason IS NOT NULL) FROM {sql_ident(filter_label)}")[0]
        rule = (f"top {spec['fraction']:.0%} of the pool" if spec.get("fraction") is not None else "fixed")
        block.update(filter=filter_label, kept=kept, dropped=dropped, rule=rule,
                     threshold=None if threshold is None else f"{threshold:.4f}")
    lo = min(lo, threshold) if threshold is not None else lo
    hi = max(hi, threshold) if threshold is not None else hi
    counts = histogram(view, source, "clip_score", float(lo), float(hi), HIST_BINS)
    block["chart"] = clip_chart(np.linspace(lo, hi, HIST_BINS + 1), counts, threshold)
    return block


# --- MetaCLIP balancing -------------------------------------------------------------------------

def curve_points(n: int) -> np.ndarray:
    if n <= MAX_CURVE_POINTS:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, MAX_CURVE_POINTS).astype(np.int64) - 1)


def balance_chart(before: np.ndarray, after: np.ndarray, t: float | None) -> str:
    fig, ax = new_axes(9.5, 3.6)
    before, after = np.sort(before)[::-1], np.sort(after)[::-1]
    ranks = curve_points(len(before))
    ax.plot(ranks + 1, before[ranks], color="#4e79a7", linewidth=2, label="before balancing")
    ax.plot(ranks + 1, after[ranks], color=KEPT_COLOUR, linewidth=2, label="after balancing")
    if t is not None:
        ax.axhline(t, color="#e15759", linestyle="--", linewidth=1.5, label=f"t = {fmt_num(t)}")
    ax.set_yscale("log", nonpositive="mask")
    if len(before) > 300:
        ax.set_xscale("log")
    ax.set_xlabel("entries, sorted by count")
    ax.set_ylabel("matched pairs per entry")
    ax.legend(frameon=False, fontsize=9)
    return png_uri(fig)


def entry_names(view: RunView, label: str, ids: list[int]) -> dict[int, tuple[str, str]]:
    """entry id -> (entry, source), from the fit's counts table; the balance stage writes it."""
    path = view.run.fit_table(label, "counts")
    if not ids or not path.exists():
        return {}
    try:
        rows = view.rows(f"SELECT entry_id, entry, source FROM read_parquet({sql_files([path])}) "
                         "WHERE entry_id IN (SELECT unnest($1::BIGINT[]))", [ids])
    except duckdb.Error:
        return {}
    return {int(i): (e, s or "") for i, e, s in rows}


def balance_block(view: RunView, label: str) -> dict | None:
    columns = view.columns(label)
    if "matched_entries" not in columns:
        return None
    spec, fitted = view.specs.get(label, {}), view.fit_values(label)
    t = fitted.get("t", spec.get("t"))
    online = bool(spec.get("online")) and "keep_prob" in columns
    # after = matches of the pairs balancing kept (online mode keeps all: their expected count)
    after = "sum(keep_prob) FILTER (WHERE reason IS NULL)" if online else "count(*) FILTER (WHERE reason IS NULL)"
    extra = ", keep_prob" if online else ""
    counts = view.con.execute(
        f"SELECT e, count(*) AS before, coalesce({after}, 0) AS kept FROM "
        f"(SELECT unnest(matched_entries) AS e, reason{extra} FROM {sql_ident(label)}) GROUP BY e").fetchnumpy()
    if not len(counts["e"]):
        return None
    ids = np.asarray(counts["e"], dtype=np.int64)
    before = np.asarray(counts["before"], dtype=np.float64)
    kept = np.asarray(counts["kept"], dtype=np.float64)
    head = before > t if t is not None else np.zeros(len(before), bool)  # no fit yet: no t to mark
    order = np.lexsort((ids[head], -before[head]))[:HEAD_ROWS]  # most matched first, ties by entry id
    head_ids = ids[head][order].tolist()
    names = entry_names(view, label, head_ids)
    total, total_after = before.sum(), kept.sum()
    head_rows = []
    for entry_id, n_before, n_after in zip(head_ids, before[head][order], kept[head][order]):
        entry, source = names.get(entry_id, (f"#{entry_id}", ""))
        head_rows.append({"entry": entry, "source": source, "before": int(n_before),
                          "after": round(float(n_after), 1) if online else int(n_after),
                          "share": fmt_pct(n_before, total)})
    return {"label": label, "t": t, "online": online, "n_entries": len(ids), "total": int(total),
            "n_head": int(head.sum()), "head": head_rows, "head_more": int(head.sum()) > len(head_rows),
            "head_share_before": fmt_pct(before[head].sum(), total),
            "head_share_after": fmt_pct(kept[head].sum(), total_after),
            "chart": balance_chart(before, kept, None if t is None else float(t))}


# --- captions ----------------------------------------------------------------------------------

def length_counts(view: RunView, sql: str) -> np.ndarray:
    counts = np.zeros(MAX_WORDS + 1, dtype=np.int64)
    for w, n in view.rows(f"SELECT least(words(x), {MAX_WORDS}) AS w, count(*) FROM ({sql}) WHERE x IS NOT NULL "
                          "GROUP BY w"):
        counts[w] = n
    return counts


def lengths_chart(before: np.ndarray, after: np.ndarray, after_name: str) -> str:
    fig, ax = new_axes(9.5, 3.0)
    words = np.arange(len(before))
    ax.bar(words - 0.2, 100 * before / max(before.sum(), 1), width=0.4, color="#bab0ac", label="original caption")
    ax.bar(words + 0.2, 100 * after / max(after.sum(), 1), width=0.4, color="#4e79a7", label=after_name)
    top = int(max(np.flatnonzero(before).max(initial=0), np.flatnonzero(after).max(initial=0)))
    ax.set_xlim(0.3, top + 0.7)
    ax.set_xlabel("words per caption" + (f" ({MAX_WORDS} = {MAX_WORDS} or more)" if top >= MAX_WORDS else ""))
    ax.set_ylabel("% of captions")
    ax.legend(frameon=False, fontsize=9)
    return png_uri(fig)


def mean_words(counts: np.ndarray) -> str:
    return f"{(counts * np.arange(len(counts))).sum() / counts.sum():.1f}" if counts.sum() else "–"


def caption_block(view: RunView, label: str) -> dict | None:
    columns = view.columns(label)
    source = sql_ident(label)
    if "rewrites" in columns:
        kind, produced = "rewrites", "len(r.rewrites) > 0"
        after_sql = f"SELECT unnest(rewrites) AS x FROM {source} WHERE len(rewrites) > 0"
        new_column = "r.rewrites"
    elif "enriched_caption" in columns:
        kind, produced = "enriched caption", "r.enriched_caption IS NOT NULL"
        after_sql = f"SELECT enriched_caption AS x FROM {source}"
        new_column = "[r.enriched_caption]"
    else:
        return None
    before_sql = f'SELECT i.caption AS x FROM {source} r JOIN "ingest" i USING (uid) WHERE {produced}'
    before, after = length_counts(view, before_sql), length_counts(view, after_sql)
    if not after.sum():
        return None
    # pick in the stage's own view (a streaming top-N), then fetch those few originals
    picked = view.rows(f"SELECT r.uid, {new_column} FROM {source} r WHERE {produced} "
                       f"ORDER BY hash(r.uid) LIMIT {EXAMPLES}")
    originals = dict(view.rows('SELECT uid, caption FROM "ingest" WHERE uid IN (SELECT unnest($1::VARCHAR[]))',
                               [[uid for uid, _ in picked]]))
    examples = [(originals.get(uid), new) for uid, new in picked]
    return {"label": label, "kind": kind, "n_before": int(before.sum()), "n_after": int(after.sum()),
            "mean_before": mean_words(before), "mean_after": mean_words(after),
            "chart": lengths_chart(before, after, kind),
            "examples": [{"original": original, "new": new or []} for original, new in examples]}


# --- sample thumbnails -------------------------------------------------------------------------

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


def thumbnail_uri(data: bytes) -> str | None:
    from PIL import Image

    try:
        with open_image(data) as image:
            if image.width * image.height > MAX_THUMB_PIXELS:
                return None
            image.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a reduced scale
            small = image.convert("RGB")
            small.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_details(view: RunView, uids: list[str]) -> dict[str, dict[str, Any]]:
    """caption, and width/height/clip_score where a stage wrote them, of a few uids: one filtered
    scan per view holding a wanted column (no join of the pool)."""
    details: dict[str, dict[str, Any]] = {uid: {} for uid in uids}
    missing = ["caption", "width", "height", "clip_score"]
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


def sample_item(uid: str, info: dict[str, Any], image: bytes | None) -> dict[str, Any]:
    caption = info.get("caption") or ""
    short = caption if len(caption) <= 160 else caption[:157] + "…"
    detail = []
    if info.get("width") and info.get("height"):
        detail.append(f"{info['width']}×{info['height']}")
    if info.get("clip_score") is not None:
        detail.append(f"clip {info['clip_score']:.3f}")
    src = thumbnail_uri(image) if image else None
    missing = "image not found" if image is None else "image not decodable"
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
    shards = shard_of_uids(view, images_at, uids)
    images: dict[str, bytes] = {}
    for shard in sorted(set(shards.values())):
        wanted = {uid for uid, s in shards.items() if s == shard}
        images.update(read_images(view.run.images(images_at, shard), wanted))
    details = sample_details(view, uids)
    out = []
    for stage, reason, rows, picked in groups:
        title = "kept" if reason is None else f"{reason} (dropped at {stage})"
        slug = re.sub(r"[^a-z0-9]+", "-", f"{stage or ''} {reason or 'kept'}".lower()).strip("-")
        items = [sample_item(uid, details.get(uid, {}), images.get(uid)) for uid in sorted(picked, key=str)]
        out.append({"title": title, "slug": slug, "total": rows, "shown": len(items), "cards": items})
    return {"image_label": images_at, "per_group": SAMPLES_PER_GROUP, "groups": out}


# --- stages: time, throughput, resources, failures -----------------------------------------------

def worker_of(spec: dict[str, Any]) -> tuple[str, str]:
    """(kind, resources per worker) of a configured stage, as the executor would schedule it."""
    from pairsift.stages import stage_class
    from pairsift.stages.base import PoolStage

    config = {k: v for k, v in spec.items() if k not in ("stage", "label")}
    try:
        cls = stage_class(spec["stage"])
        stage = cls(cls.config_class(**config))
        resources = stage.resources
    except Exception:  # noqa: BLE001 - a config that no longer validates here (moved model) still reports
        cpus, gpus = config.get("cpus", "?"), config.get("gpus", 0) or 0
        return "?", f"{cpus} CPU" + (f", {gpus} GPU" if gpus else "")
    kind = ("pool fit + " if isinstance(stage, PoolStage) else "") + ("actor pool" if cls.stateful else "tasks")
    text = f"{resources.cpus:g} CPU" + (f", {resources.gpus:g} GPU" if resources.gpus else "")
    return kind, text


def shard_seconds(view: RunView, label: str) -> float | None:
    """Seconds every finished shard took in its worker, over all runs (from the done markers)."""
    markers = view.run.done_markers(label) + view.run.done_markers(label, partials=True)
    if not markers:
        return None
    try:
        (total,) = view.rows(f"SELECT sum(seconds) FROM read_json({sql_files(markers)}, "
                             "columns={'seconds': 'DOUBLE'})")[0]
    except duckdb.Error:
        return None
    return total


def failed_shards(view: RunView, labels: list[str]) -> list[dict[str, Any]]:
    failed = []
    for label in labels:
        for marker, state in view.run.failures(label):
            where = label + (" (partial)" if is_partial(marker) else "")
            failed.append({"label": where, "shard": shard_of(marker), "attempts": state.attempts, "error": state.error})
    return failed


def row_errors(view: RunView) -> list[tuple[str, str, int]]:
    out = []
    for label in view.present[1:]:
        if "error" in view.columns(label):
            out += [(label, (e or "")[:200], n) for e, n in view.rows(
                f"SELECT error, count(*) AS n FROM {sql_ident(label)} WHERE error IS NOT NULL AND error <> '' "
                "GROUP BY error ORDER BY n DESC LIMIT 8")]
    return out


def executor_line(config: dict[str, Any]) -> str:
    executor, ray = config.get("executor", {}), config.get("ray", {})
    text = f"executor {executor.get('kind', '?')}, {executor.get('max_retries', '?')} retries per shard"
    if executor.get("max_workers"):
        text += f", at most {executor['max_workers']} shards at once"
    if executor.get("kind") == "ray":
        where = ray.get("address") or f"local Ray on {ray.get('node_ip', '?')}"
        text += f"; {where}" + (f" with {ray['num_cpus']} CPUs" if ray.get("num_cpus") else "")
    return text


def stage_times_chart(rows: list[dict[str, Any]]) -> str | None:
    timed = [r for r in rows if isinstance(r["seconds_value"], float) and r["seconds_value"] > 0]
    if not timed:
        return None
    fig, ax = new_axes(9.5, 0.35 * len(timed) + 0.9)
    ax.barh(range(len(timed)), [r["seconds_value"] for r in timed], color="#4e79a7", height=0.6)
    for y, r in enumerate(timed):
        ax.text(r["seconds_value"], y, f"  {r['seconds_value']:.1f} s, {r['rows_per_s']} rows/s", va="center",
                fontsize=9)
    ax.set_yticks(range(len(timed)), [r["label"] for r in timed])
    ax.invert_yaxis()
    ax.set_xlim(0, max(r["seconds_value"] for r in timed) * 1.35)
    ax.set_xlabel("wall time of this run (s)")
    return png_uri(fig)


def stages_section(view: RunView) -> dict | None:
    runs = {r["label"]: r for r in view.meta.get("stage_runs", [])}
    labels = list(view.specs) + ["shards"]
    rows = []
    for label in labels:
        run = runs.get(label, {})
        spec = view.specs.get(label)
        kind, resources = worker_of(spec) if spec else ("writer", "tasks")
        spent = shard_seconds(view, label)
        seconds = run.get("seconds")
        rows.append({"label": label, "stage": view.kind(label), "kind": kind, "resources": resources,
                     "shards_done": run.get("shards_done", "–"), "shards_skipped": run.get("shards_skipped", "–"),
                     "shards_failed": len(run.get("shards_failed") or {}),
                     "shards_blocked": run.get("shards_blocked", "–"), "rows": run.get("rows"),
                     "seconds": "–" if seconds is None else f"{seconds:.1f}", "seconds_value": float(seconds) if seconds is not None else None,
                     "rows_per_s": fmt_num(run.get("rows_per_s")),
                     "shard_seconds": "–" if spent is None else f"{spent:.1f}"})
    return {"executor": executor_line(view.meta.get("config", {})), "rows": rows,
            "chart": stage_times_chart(rows), "failed": failed_shards(view, labels),
            "row_errors": row_errors(view)}


# --- the demo's comparison ---------------------------------------------------------------------

def comparison_section(run: RunDir) -> dict | None:
    """``report/comparison.json``: a list of rows {"name": ..., metric: value, ...} (or {"rows": [...]})."""
    path = run.root / "report" / "comparison.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{path.name} is unreadable: {exc}", "rows": [], "columns": []}
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return {"error": f"{path.name}: expected a list of objects, one per model", "rows": [], "columns": []}
    columns = ["name"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    decimals = {c: column_decimals([row.get(c) for row in rows]) for c in columns}
    cells = [[str(row.get(c, "")) if c == "name" else fmt_metric(row.get(c), decimals[c]) for c in columns]
             for row in rows]
    return {"error": None, "columns": columns, "rows": cells}


def column_decimals(values: list[Any]) -> int:
    """Decimals that show every float of a column exactly (at most 4): 52.2 and 53.0 read alike."""
    needed = 0
    for value in values:
        if isinstance(value, float) and value == value:
            needed = max(needed, next((d for d in range(5) if abs(round(value, d) - value) < 1e-9), 4))
    return needed


def fmt_metric(value: Any, decimals: int) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.{decimals}f}"
    return fmt_num(value)


# --- the page ----------------------------------------------------------------------------------

SECTION_TITLES = {"funnel": "Funnel", "clip": "CLIP score", "balance": "Balancing", "captions": "Captions",
                  "samples": "Samples", "stages": "Stages", "comparison": "Comparison"}
SECTION_IDS = {"funnel": "funnel", "clip": "clip-score", "balance": "balance", "captions": "captions",
               "samples": "samples", "stages": "stages", "comparison": "comparison"}


def header(view: RunView) -> dict[str, Any]:
    meta, root = view.meta, view.run.root.resolve()
    started, finished = meta.get("started_at"), meta.get("finished_at")
    return {"name": "/".join(root.parts[-2:]), "path": str(root), "status": meta.get("status", "unknown"),
            "started": dt.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M") if started else None,
            "wall": fmt_seconds(finished - started) if started and finished else None,
            "samples_written": meta.get("samples_written"), "output_shards": meta.get("output_shards")}


def build_context(run_dir: Path) -> dict[str, Any]:
    view = open_view(run_dir)
    sections: dict[str, Any] = {
        "funnel": funnel_section(view),
        "clip": [b for b in (clip_block(view, x) for x in view.labels_of("clip_score")) if b],
        "balance": [b for b in (balance_block(view, x) for x in view.labels_of("balance")) if b],
        "captions": [b for b in (caption_block(view, x) for x in view.present[1:]) if b],
        "samples": samples_section(view),
        "stages": stages_section(view),
        "comparison": comparison_section(view.run),
    }
    nav = [{"id": SECTION_IDS[k], "title": SECTION_TITLES[k]} for k, v in sections.items() if v]
    nav.append({"id": "config", "title": "Config"})
    return sections | {
        "run": header(view), "nav": nav, "versions": sorted(view.meta.get("versions", {}).items()),
        "config_text": json.dumps(view.meta.get("config", {}), indent=2, default=str),
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def render(context: dict[str, Any]) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_num
    return env.get_template(TEMPLATE.name).render(**context)


def write_report(run_dir: Path) -> Path:
    """Write ``<run>/report/index.html`` and return its path."""
    run_dir = as_path(run_dir)
    html = render(build_context(run_dir))
    path = run_dir / "report" / "index.html"
    write_atomic(path, html)
    return path
