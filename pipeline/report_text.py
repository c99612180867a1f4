"""Plain-terminal output: the funnel, the plan, query results, the end-of-run summary."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from pairsift.common.storage import as_path
from pairsift.pipeline.catalog import funnel
from pairsift.pipeline.config import RunConfig
from pairsift.pipeline.contracts import contract_of
from pairsift.pipeline.run_dir import RunDir
from pairsift.stages import stage_class
from pairsift.stages.base import PoolStage

console = Console()


def print_table(columns: list[str], rows: list[tuple], limit: int = 200) -> None:
    table = Table(*columns, show_lines=False)
    for row in rows[:limit]:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    console.print(table)
    if len(rows) > limit:
        console.print(f"... {len(rows) - limit} more rows")


def print_funnel(run_dir: str | Path) -> None:
    table = Table("stage", "rows in", "kept", "dropped (by reason)", "shards failed", title=f"funnel of {run_dir}")
    for stage in funnel(run_dir):
        dropped = ", ".join(f"{r}={n:,}" for r, n in sorted(stage.dropped.items(), key=lambda kv: -kv[1]))
        failed = ", ".join(f"{s}: {e[:60]}" for s, e in stage.failed_shards.items()) or "-"
        table.add_row(stage.label, f"{stage.rows_in:,}", f"{stage.kept:,}", dropped or "-", failed)
    console.print(table)


def print_summary(summary) -> None:
    for report in summary.stages:
        console.print(f"{report.label:>14}: {report.shards_done} shards run, {report.shards_skipped} already done"
                      + (f", {len(report.shards_failed)} FAILED" if report.shards_failed else "")
                      + (f", {report.shards_blocked} blocked by earlier failures" if report.shards_blocked else "")
                      + (f"  ({report.rows_per_s:,.0f} rows/s)" if report.rows else ""))
    root = as_path(summary.run_dir)
    console.print(f"shards:  {root / 'shards'} ({summary.output_shards} tars, {summary.samples_written:,} samples)")
    console.print(f"catalog: pairsift query {root} \"SELECT reason, count(*) FROM samples GROUP BY 1\"")
    console.print(f"funnel:  pairsift status {root}")
    if summary.failed:
        console.print(f"[red]failed shards: {summary.failed} — rerun the same command to retry them[/red]")


def print_plan(cfg: RunConfig) -> None:
    run = RunDir(cfg.run_dir)
    hashes = cfg.stage_hashes()
    n_shards = len(run.parts("ingest"))
    table = Table("#", "stage", "kind", "cpus", "gpus", "worker", "done", "config hash", title=f"plan for {cfg.run_dir}")
    for index, spec in enumerate(cfg.stages):
        cls = stage_class(spec.stage)
        stage = cls(spec.config)
        done = sum(run.is_done(run.part(spec.label, s), hashes[spec.label]) for s in range(n_shards))
        table.add_row(str(index + 1), spec.label, "pool (fit)" if isinstance(stage, PoolStage) else "per shard",
                      f"{stage.resources.cpus:g}", f"{stage.resources.gpus:g}",
                      "actor pool" if cls.stateful else "tasks",
                      f"{done}/{n_shards}" if n_shards else "-", hashes[spec.label])
    console.print(table)
    console.print(f"input: {cfg.input.path} ({n_shards} shards ingested so far); "
                  f"ray: {cfg.ray.address or 'local on ' + cfg.ray.node_ip}")
    print_contracts(cfg)


def print_contracts(cfg: RunConfig) -> None:
    """What each stage reads, writes and drops with, from its contract."""
    table = Table("stage", "reads", "writes", "drops with", "--retry-failed retries", title="stage contracts")
    for spec in cfg.stages:
        contract = contract_of(spec)
        retried = ", ".join(contract.retryable) + (
            f" (on request: {', '.join(contract.retryable_on_request)})" if contract.retryable_on_request else "")
        table.add_row(spec.label, ", ".join((*contract.reads, *(f"[{c}]" for c in contract.optional))),
                      ", ".join(contract.writes), ", ".join(contract.reasons) or "-", retried or "-")
    console.print(table)
