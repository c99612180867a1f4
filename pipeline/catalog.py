"""The catalog: DuckDB over a run directory's parquet parts, one view per stage plus ``samples``.

``samples`` has one row per input row: the ingest columns, every stage's columns (NULL where the
row never reached that stage), ``<stage>_reason`` per stage, and ``reason`` / ``dropped_at`` saying
where and why the row left the pipeline (both NULL for kept samples; ``'takedown'`` for both when
``pairsift takedown`` removed it, listed in the ``takedowns`` view). Queries read parquet lazily,
so a catalog of billions of rows opens instantly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from pairsift.common.storage import AnyPath, is_remote
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.run_dir import RunDir, shard_of


def sql_ident(name: str) -> str:
    """An identifier (a view or column name) as SQL: labels come from run.json, which anyone can edit."""
    return '"' + name.replace('"', '""') + '"'


def sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _literal_path(path: AnyPath) -> str:
    """A path DuckDB reads as exactly that file: its glob characters matched literally, so a run
    directory named ``r[v2]`` or ``run-*`` never reads a sibling run's files."""
    return re.sub(r"([\[*?])", r"[\1]", str(path))


def sql_files(paths: list[AnyPath]) -> str:
    """An explicit list of files for DuckDB's readers (never a glob over a directory)."""
    return "[" + ", ".join(sql_str(_literal_path(p)) for p in paths) + "]"


def stage_labels(run: RunDir) -> list[str]:
    """Stages in pipeline order, from run.json, that have at least one part on disk."""
    return run.labels_with_parts()


def open_catalog(run_root: str | Path) -> duckdb.DuckDBPyConnection:
    run = RunDir(run_root)
    labels = stage_labels(run)
    if "ingest" not in labels:
        raise UserError(f"{run.root}: no ingested rows yet; run the pipeline first")
    con = duckdb.connect()
    if is_remote(run.root):
        # DuckDB reads through the run's own fsspec filesystem: no httpfs extension to download.
        con.register_filesystem(run.root.fs)
    for label in labels:
        con.execute(f"CREATE VIEW {sql_ident(label)} AS SELECT * FROM "
                    f"read_parquet({sql_files(run.parts(label))}, union_by_name=true)")
    if run.shards.tables():
        con.execute(f"CREATE VIEW shards AS SELECT * FROM read_parquet({sql_files(run.shards.tables())}, "
                    "union_by_name=true, filename=true)")
    takedowns = run.takedowns.exists()
    if takedowns:
        con.execute(f"CREATE VIEW takedowns AS SELECT * FROM read_parquet({sql_files([run.takedowns])})")
    con.execute(_samples_view(con, labels, takedowns))
    return con


def _samples_view(con: duckdb.DuckDBPyConnection, labels: list[str], takedowns: bool = False) -> str:
    seen = set(con.execute('SELECT * FROM "ingest" LIMIT 0').fetchdf().columns)
    select = ['"ingest".*']
    joins = []
    reasons = []
    for label in labels[1:]:
        columns = con.execute(f"SELECT * FROM {sql_ident(label)} LIMIT 0").fetchdf().columns
        for column in columns:
            if column in ("uid", "reason") or column in seen:
                continue
            seen.add(column)
            select.append(f"{sql_ident(label)}.{sql_ident(column)}")
        select.append(f"{sql_ident(label)}.reason AS {sql_ident(label + '_reason')}")
        reasons.append(label)
        joins.append(f"LEFT JOIN {sql_ident(label)} USING (uid)")
    coalesce = "COALESCE(" + ", ".join(f"{sql_ident(r)}.reason" for r in reasons) + ")" if reasons else "NULL"
    cases = [f"WHEN {sql_ident(r)}.reason IS NOT NULL THEN {sql_str(r)}" for r in reasons]
    if takedowns:  # a takedown overrides whatever the pipeline decided: the sample is gone
        joins.append('LEFT JOIN (SELECT DISTINCT uid, true AS taken_down FROM "takedowns") AS "__takedown" USING (uid)')
        coalesce = f"CASE WHEN \"__takedown\".taken_down THEN 'takedown' ELSE {coalesce} END"
        cases.insert(0, "WHEN \"__takedown\".taken_down THEN 'takedown'")
    if cases:
        select.append(f"{coalesce} AS reason")
        select.append(f"CASE {' '.join(cases)} END AS dropped_at")
    return f"CREATE VIEW samples AS SELECT {', '.join(select)} FROM \"ingest\" {' '.join(joins)}"


def query(run_root: str | Path, sql: str) -> tuple[list[str], list[tuple]]:
    con = open_catalog(run_root)
    try:
        result = con.execute(sql)
    except duckdb.Error as exc:
        raise UserError(f"query failed: {str(exc).splitlines()[0]}") from None
    columns = [d[0] for d in result.description] if result.description else []
    return columns, result.fetchall()


@dataclass
class StageFunnel:
    label: str
    rows_in: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    failed_shards: dict[int, str] = field(default_factory=dict)
    pending_shards: int = 0

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.kept + sum(self.dropped.values())


def funnel(run_root: str | Path) -> list[StageFunnel]:
    """Rows in, kept and dropped by reason, per stage, straight from the parts on disk. A stage's rows
    in are what the stage before it kept in the same shards, so a lost or extra row unbalances it."""
    run = RunDir(run_root)
    con = open_catalog(run_root)
    present = set(stage_labels(run))
    n_shards = run.n_shards()
    result = []
    kept_before: dict[int, int] = {}
    for label in run.labels():
        failed = {shard_of(marker): state.error for marker, state in run.failures(label)}
        if label not in present:
            result.append(StageFunnel(label, 0, 0, failed_shards=failed, pending_shards=n_shards))
            kept_before = {}
            continue
        counts = _reason_counts(con, run.parts(label))
        dropped: dict[str, int] = {}
        kept: dict[int, int] = {}
        for shard, reason, n in counts:
            if reason is None:
                kept[shard] = kept.get(shard, 0) + n
            else:
                dropped[reason] = dropped.get(reason, 0) + n
        shards = {shard for shard, _, _ in counts}
        if label == "ingest":
            rows_in = _ingested_rows(run, sum(kept.values()))
        else:
            rows_in = sum(kept_before.get(shard, 0) for shard in shards)
        pending = 0 if label == "ingest" else max(0, n_shards - len(run.done_markers(label)) - len(failed))
        result.append(StageFunnel(label, rows_in, sum(kept.values()), dict(sorted(dropped.items(), key=lambda x: -x[1])),
                                  failed, pending))
        kept_before = kept
    return result


def _reason_counts(con: duckdb.DuckDBPyConnection, parts: list[AnyPath]) -> list[tuple[int, str | None, int]]:
    """(shard, reason, rows) over a stage's parts; ingest's parts have no reason: all kept."""
    source = f"read_parquet({sql_files(parts)}, union_by_name=true, filename=true)"
    columns = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    reason = "reason" if "reason" in columns else "NULL::VARCHAR"
    rows = con.execute(f"SELECT filename, {reason}, count(*) FROM {source} GROUP BY ALL").fetchall()
    return [(shard_of(Path(filename)), r, n) for filename, r, n in rows]


def _ingested_rows(run: RunDir, found: int) -> int:
    """The row count ingest recorded when it cut the input (what the parts must add up to)."""
    try:
        return int(json.loads(run.manifest.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return found
