"""The run report's data sections: the funnel, score histograms, concept counts and captions.

Nothing here names a stage or a column: each section asks the stages' contracts (``scores``,
``concepts``, ``weight``, ``captions``; see ``pairsift.stages.base.Contract``) which of the columns
on disk are worth showing, and how.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
from matplotlib.patches import Patch

from pairsift.pipeline.catalog import funnel, sql_files, sql_ident
from pairsift.pipeline.report_view import KEPT_COLOUR, PALETTE, RunView, fmt_num, fmt_pct, new_axes, png_uri
from pairsift.stages.base import ConceptSpec, ScoreSpec

HEAD_ROWS = 25
EXAMPLES = 6
HIST_BINS = 50
MAX_WORDS = 60  # caption-length histograms put longer captions in a last "60+" bin
MAX_CURVE_POINTS = 4000  # entry-count curves of 500k entries are drawn from log-spaced ranks


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


# --- scores ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreSource:
    label: str  # the stage that wrote the column: its rows are histogrammed
    column: str
    spec: ScoreSpec
    cut_label: str | None  # the stage that cut at a fitted threshold of it (the writer, or a later one)
    cut: ScoreSpec | None


def score_sources(view: RunView) -> list[ScoreSource]:
    """Every declared score column, once per stage writing it, with the stage that cuts at it: the
    writer when it declares a threshold, else the first later stage that does before it is rewritten."""
    labels = list(view.specs)
    sources = []
    for index, label in enumerate(labels):
        contract = view.contract(label)
        for column, spec in contract.scores.items():
            if column not in contract.writes or label not in view.present:
                continue  # a stage that only cuts at a column is found from its writer
            cut_label = label if spec.threshold else None
            for later in ([] if cut_label else labels[index + 1:]):
                declared = view.contract(later)
                if column in declared.writes:
                    break
                if column in declared.scores and declared.scores[column].threshold:
                    cut_label = later
                    break
            if cut_label not in view.present:
                cut_label = None
            cut = view.contract(cut_label).scores[column] if cut_label else None
            sources.append(ScoreSource(label, column, spec, cut_label, cut))
    return sources


def histogram(view: RunView, source: str, expr: str, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of ``expr`` in ``bins`` equal bins over [lo, hi], computed by DuckDB."""
    width = (hi - lo) / bins or 1.0
    counts = np.zeros(bins, dtype=np.int64)
    sql = (f"SELECT least(greatest(floor(({expr} - {lo!r}) / {width!r}), 0), {bins - 1})::INT AS b, count(*) "
           f"FROM {source} WHERE isfinite({expr}) GROUP BY b")
    for b, n in view.rows(sql):
        counts[b] = n
    return counts


def score_chart(edges: np.ndarray, counts: np.ndarray, threshold: float | None, xlabel: str) -> str:
    fig, ax = new_axes(9.5, 3.2)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.zeros(len(counts), bool) if threshold is None else centres < threshold
    width = edges[1] - edges[0]
    ax.bar(centres[~below], counts[~below], width=width * 0.95, color="#4e79a7",
           label="at or above threshold" if threshold is not None else "rows")
    if below.any():
        ax.bar(centres[below], counts[below], width=width * 0.95, color="#bab0ac", label="below threshold")
    if threshold is not None:
        ax.axvline(threshold, color="#e15759", linewidth=2, label=f"threshold {threshold:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(frameon=False, fontsize=9)
    return png_uri(fig)


def score_block(view: RunView, source: ScoreSource) -> dict | None:
    if source.column not in view.columns(source.label):
        return None
    table, value = sql_ident(source.label), f"CAST({sql_ident(source.column)} AS DOUBLE)"
    n, mean, median, lo, hi = view.rows(f"SELECT count(*), avg({value}), median({value}), min({value}), "
                                        f"max({value}) FROM {table} WHERE isfinite({value})")[0]
    if not n:
        return None
    block: dict[str, Any] = {"label": source.label, "column": source.column, "n": n, "mean": f"{mean:.4g}",
                             "median": f"{median:.4g}", "filter": None, "threshold": None}
    threshold = None
    if source.cut_label is not None and source.cut is not None:
        threshold = view.fit_values(source.cut_label).get(source.cut.threshold)
        kept, dropped = view.rows(f"SELECT count(*) FILTER (WHERE reason IS NULL), count(*) FILTER "
                                  f"(WHERE reason IS NOT NULL) FROM {sql_ident(source.cut_label)}")[0]
        block.update(filter=source.cut_label if source.cut_label != source.label else None, kept=kept,
                     dropped=dropped, rule=source.cut.rule or "fitted",
                     threshold=None if threshold is None else f"{threshold:.4f}")
    lo = min(lo, threshold) if threshold is not None else lo
    hi = max(hi, threshold) if threshold is not None else hi
    counts = histogram(view, table, value, float(lo), float(hi), HIST_BINS)
    block["chart"] = score_chart(np.linspace(lo, hi, HIST_BINS + 1), counts, threshold, source.spec.label)
    return block


def scores_section(view: RunView) -> list[dict]:
    return [b for b in (score_block(view, s) for s in score_sources(view)) if b]


# --- concepts (metadata entries, balancing) --------------------------------------------------

def curve_points(n: int) -> np.ndarray:
    if n <= MAX_CURVE_POINTS:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, MAX_CURVE_POINTS).astype(np.int64) - 1)


def concept_chart(before: np.ndarray, after: np.ndarray, cap: float | None) -> str:
    fig, ax = new_axes(9.5, 3.6)
    before, after = np.sort(before)[::-1], np.sort(after)[::-1]
    ranks = curve_points(len(before))
    ax.plot(ranks + 1, before[ranks], color="#4e79a7", linewidth=2, label="every row the stage saw")
    ax.plot(ranks + 1, after[ranks], color=KEPT_COLOUR, linewidth=2, label="rows it kept")
    if cap is not None:
        ax.axhline(cap, color="#e15759", linestyle="--", linewidth=1.5, label=f"t = {fmt_num(cap)}")
    ax.set_yscale("log", nonpositive="mask")
    if len(before) > 300:
        ax.set_xscale("log")
    ax.set_xlabel("concepts, sorted by count")
    ax.set_ylabel("matched rows per concept")
    ax.legend(frameon=False, fontsize=9)
    return png_uri(fig)


def concept_names(view: RunView, label: str, table: str | None, ids: list) -> dict[Any, tuple[str, str]]:
    """value -> (name, source), from the fit table that names integer values (when declared)."""
    path = view.run.fit_table(label, table) if table else None
    if not ids or path is None or not path.exists():
        return {}
    try:
        rows = view.rows(f"SELECT entry_id, entry, source FROM read_parquet({sql_files([path])}) "
                         "WHERE entry_id IN (SELECT unnest($1::BIGINT[]))", [ids])
    except duckdb.Error:
        return {}
    return {int(i): (e, s or "") for i, e, s in rows}


def concept_counts(view: RunView, label: str, column: str, weight: str | None) -> dict[str, np.ndarray]:
    """Per value of ``column``: rows matching it, and those kept (or, weighted, their expected count)."""
    after = f"sum({weight}) FILTER (WHERE reason IS NULL)" if weight else "count(*) FILTER (WHERE reason IS NULL)"
    extra = f", {weight}" if weight else ""
    return view.con.execute(
        f"SELECT e, count(*) AS before, coalesce({after}, 0) AS kept FROM "
        f"(SELECT unnest({sql_ident(column)}) AS e, reason{extra} FROM {sql_ident(label)}) GROUP BY e").fetchnumpy()


def concept_block(view: RunView, label: str, column: str, spec: ConceptSpec) -> dict | None:
    columns = view.columns(label)
    if column not in columns:
        return None
    weight = view.contract(label).weight
    weight = weight if weight in columns else None
    fitted = view.fit_values(label)
    cap = fitted.get(spec.cap, view.specs[label].get(spec.cap)) if spec.cap else None
    counts = concept_counts(view, label, column, sql_ident(weight) if weight else None)
    if not len(counts["e"]):
        return None
    ids = np.asarray(counts["e"])
    before = np.asarray(counts["before"], dtype=np.float64)
    kept = np.asarray(counts["kept"], dtype=np.float64)
    head = before > cap if cap is not None else np.ones(len(before), bool)  # no cap: the most matched
    order = np.lexsort((ids[head], -before[head]))[:HEAD_ROWS]  # most matched first, ties by value
    head_ids = ids[head][order].tolist()
    names = concept_names(view, label, spec.names, head_ids if ids.dtype.kind in "iu" else [])
    total, total_after = before.sum(), kept.sum()
    head_rows = []
    for value, n_before, n_after in zip(head_ids, before[head][order], kept[head][order]):
        entry, source = names.get(value, (f"#{value}" if spec.names else str(value), ""))
        head_rows.append({"entry": entry, "source": source, "before": int(n_before),
                          "after": round(float(n_after), 1) if weight else int(n_after),
                          "share": fmt_pct(n_before, total)})
    return {"label": label, "column": column, "title": spec.label, "t": cap, "online": weight is not None,
            "weight": weight, "n_entries": len(ids), "total": int(total), "n_head": int(head.sum()),
            "head": head_rows, "head_more": int(head.sum()) > len(head_rows),
            "head_share_before": fmt_pct(before[head].sum(), total),
            "head_share_after": fmt_pct(kept[head].sum(), total_after),
            "chart": concept_chart(before, kept, None if cap is None else float(cap))}


def concepts_section(view: RunView) -> list[dict]:
    blocks = (concept_block(view, label, column, spec) for label in view.present if label in view.specs
              for column, spec in view.contract(label).concepts.items())
    return [b for b in blocks if b]


# --- captions --------------------------------------------------------------------------------

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


def caption_block(view: RunView, label: str, column: str) -> dict | None:
    types = view.column_types(label)
    if column not in types:
        return None
    source, new = sql_ident(label), sql_ident(column)
    if types[column].endswith("[]"):  # a list column: several captions per row
        produced, after_sql, new_list = f"len(r.{new}) > 0", f"SELECT unnest({new}) AS x FROM {source}", f"r.{new}"
    else:
        produced, after_sql, new_list = f"r.{new} IS NOT NULL", f"SELECT {new} AS x FROM {source}", f"[r.{new}]"
    before_sql = f'SELECT i.caption AS x FROM {source} r JOIN "ingest" i USING (uid) WHERE {produced}'
    before, after = length_counts(view, before_sql), length_counts(view, after_sql)
    if not after.sum():
        return None
    kind = column.replace("_", " ")
    # pick in the stage's own view (a streaming top-N), then fetch those few originals
    picked = view.rows(f"SELECT r.uid, {new_list} FROM {source} r WHERE {produced} "
                       f"ORDER BY hash(r.uid) LIMIT {EXAMPLES}")
    originals = dict(view.rows('SELECT uid, caption FROM "ingest" WHERE uid IN (SELECT unnest($1::VARCHAR[]))',
                               [[uid for uid, _ in picked]]))
    return {"label": label, "kind": kind, "n_before": int(before.sum()), "n_after": int(after.sum()),
            "mean_before": mean_words(before), "mean_after": mean_words(after),
            "chart": lengths_chart(before, after, kind),
            "examples": [{"original": originals.get(uid), "new": texts or []} for uid, texts in picked]}


def captions_section(view: RunView) -> list[dict]:
    blocks = (caption_block(view, label, column) for label in view.present[1:] if label in view.specs
              for column in view.contract(label).captions)
    return [b for b in blocks if b]
