"""The catalog: DuckDB over a run directory's parquet parts, one view per stage plus ``samples``.

``samples`` has one row per input row: the ingest columns, every stage's columns (NULL where the
row never reached that stage), ``<stage>_reason`` per stage, and ``reason`` / ``dropped_at`` saying
where and why the row left the pipeline (both NULL for kept samples; ``'takedown'`` for both when
``pairsift takedown`` removed it, listed in the ``takedowns`` view). Queries read parquet lazily,
so a catalog of billions of rows opens instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from pairsift.common.storage import AnyPath, is_remote
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.run_dir import RunDir


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _glob(path: AnyPath) -> str:
    return str(path).replace("'", "''")


def stage_labels(run: RunDir) -> list[str]:
    """Stages in pipeline order, from run.json, that have at least one part on disk."""
    config = run.read_run_json()["config"]
    labels = ["ingest"] + [s["label"] for s in config.get("stages", [])]
    return [label for label in labels if any(run.stage_dir(label).glob("part-*.parquet"))]


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
        con.execute(f"CREATE VIEW {_quote(label)} AS SELECT * FROM "
                    f"read_parquet('{_glob(run.stage_dir(label))}/part-*.parquet', union_by_name=true)")
    if any(run.shards_dir.glob("*.parquet")):
        con.execute(f"CREATE VIEW shards AS SELECT * FROM read_parquet('{_glob(run.shards_dir)}/[0-9]*.parquet', "
                    "union_by_name=true, filename=true)")
    takedowns = run.root / "takedowns.parquet"
    if takedowns.exists():
        con.execute(f"CREATE VIEW takedowns AS SELECT * FROM read_parquet('{_glob(takedowns)}')")
    con.execute(_samples_view(con, labels, takedowns.exists()))
    return con


def _samples_view(con: duckdb.DuckDBPyConnection, labels: list[str], takedowns: bool = False) -> str:
    seen = set(con.execute('SELECT * FROM "ingest" LIMIT 0').fetchdf().columns)
    select = ['"ingest".*']
    joins = []
    reasons = []
    for label in labels[1:]:
        columns = con.execute(f"SELECT * FROM {_quote(label)} LIMIT 0").fetchdf().columns
        for column in columns:
            if column in ("uid", "reason") or column in seen:
                continue
            seen.add(column)
            select.append(f"{_quote(label)}.{_quote(column)}")
        select.append(f"{_quote(label)}.reason AS {_quote(label + '_reason')}")
        reasons.append(label)
        joins.append(f"LEFT JOIN {_quote(label)} USING (uid)")
    coalesce = "COALESCE(" + ", ".join(f"{_quote(r)}.reason" for r in reasons) + ")" if reasons else "NULL"
    cases = [f"WHEN {_quote(r)}.reason IS NOT NULL THEN '{r}'" for r in reasons]
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
    """Rows in, kept and dropped by reason, per stage, straight from the parts on disk."""
    run = RunDir(run_root)
    con = open_catalog(run_root)
    config = run.read_run_json()["config"]
    labels = ["ingest"] + [s["label"] for s in config.get("stages", [])]
    present = set(stage_labels(run))
    result = []
    n_shards = len(list(run.stage_dir("ingest").glob("part-*.parquet")))
    for label in labels:
        failed = {}
        for marker in sorted(run.stage_dir(label).glob("*.failed.json")):
            state = run.read_failed(marker.with_name(marker.name.replace(".failed.json", ".parquet")))
            if state is not None:
                failed[int(marker.name.split("-")[1][:5])] = state.error
        if label not in present:
            result.append(StageFunnel(label, 0, 0, failed_shards=failed, pending_shards=n_shards))
            continue
        if label == "ingest":
            (rows,) = con.execute('SELECT count(*) FROM "ingest"').fetchone()
            result.append(StageFunnel(label, rows, rows))
            continue
        rows = con.execute(f"SELECT reason, count(*) FROM {_quote(label)} GROUP BY reason ORDER BY 2 DESC").fetchall()
        dropped = {r: n for r, n in rows if r is not None}
        kept = sum(n for r, n in rows if r is None)
        done = len(list(run.stage_dir(label).glob("part-*.done.json")))
        result.append(StageFunnel(label, kept + sum(dropped.values()), kept, dropped, failed,
                                  max(0, n_shards - done - len(failed))))
    return result
