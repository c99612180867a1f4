"""The run report: one self-contained HTML page showing where a run's data went (``pairsift report RUN``).

``write_report(run_dir)`` writes ``<run>/report/index.html``: the funnel, a histogram of every score
column a stage's contract declares (with the threshold a later stage fitted on it), counts per concept
before and after balancing, caption lengths before and after each declared caption column, thumbnails
per drop reason and of kept samples (never of a row dropped with a private reason), per-stage time,
throughput and resources, failed shards, and the demo's model comparison when
``report/comparison.json`` exists. A section appears only when its data does; none names a stage or a
column: they ask the contracts. Numbers are DuckDB aggregates over the parquet parts (a 2M-row catalog
reports in about 7 s on 2 cores). Plots (matplotlib) and thumbnails are embedded as data URIs, and a
Content-Security-Policy forbids every fetch and every script: captions are untrusted web text,
escaped by the template's autoescaping.

The sections live in ``report_sections`` (funnel, scores, concepts, captions), ``report_samples``
(thumbnails) and ``report_view`` (the catalog, contracts, formats); this module holds the stage
timings, the comparison and the page.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import duckdb
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pairsift.common.storage import as_path
from pairsift.pipeline.catalog import sql_files, sql_ident
from pairsift.pipeline.report_samples import (
    SAMPLES_PER_GROUP,
    read_images,
    samples_section,
    thumbnail_uri,
)
from pairsift.pipeline.report_sections import (
    captions_section,
    concepts_section,
    funnel_section,
    scores_section,
)
from pairsift.pipeline.report_view import RunView, fmt_num, fmt_seconds, new_axes, open_view, png_uri
from pairsift.pipeline.run_dir import RunDir, is_partial, shard_of, write_atomic
from pairsift.stages.base import PoolStage

__all__ = ["SAMPLES_PER_GROUP", "build_context", "read_images", "render", "thumbnail_uri",
           "write_report"]

TEMPLATE = Path(__file__).with_name("report_template.html")


# --- stages: time, throughput, resources, failures -----------------------------------------------

def worker_of(view: RunView, label: str) -> tuple[str, str]:
    """(kind, resources per worker) of a configured stage, as the executor would schedule it."""
    stage, config = view.stage(label), view.specs[label]
    if stage is None:
        cpus, gpus = config.get("cpus", "?"), config.get("gpus", 0) or 0
        return "?", f"{cpus} CPU" + (f", {gpus} GPU" if gpus else "")
    try:
        resources = stage.resources
    except Exception:  # noqa: BLE001 - a config that no longer validates here (moved model) still reports
        cpus, gpus = config.get("cpus", "?"), config.get("gpus", 0) or 0
        return "?", f"{cpus} CPU" + (f", {gpus} GPU" if gpus else "")
    kind = ("pool fit + " if isinstance(stage, PoolStage) else "") + ("actor pool" if stage.stateful else "tasks")
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
        kind, resources = worker_of(view, label) if spec else ("writer", "tasks")
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

SECTION_TITLES = {"funnel": "Funnel", "scores": "Scores", "concepts": "Concepts", "captions": "Captions",
                  "samples": "Samples", "stages": "Stages", "comparison": "Comparison"}


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
        "scores": scores_section(view),
        "concepts": concepts_section(view),
        "captions": captions_section(view),
        "samples": samples_section(view),
        "stages": stages_section(view),
        "comparison": comparison_section(view.run),
    }
    nav = [{"id": k, "title": SECTION_TITLES[k]} for k, v in sections.items() if v]
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
