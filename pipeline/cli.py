"""The ``pairsift`` command: a thin shell over functions that tests call directly.

Every error a user can cause ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from pairsift.common.overrides import OverrideError, parse_overrides
from pairsift.pipeline.errors import UserError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Curate image-text pretraining data on Ray: download, filter, balance, recaption, shard.")
metadata_app = typer.Typer(no_args_is_help=True, help="MetaCLIP metadata (concept entry lists).")
app.add_typer(metadata_app, name="metadata")

ConfigArg = Annotated[str, typer.Argument(help="a config file, or a preset name from configs/ (e.g. demo)")]
RunArg = Annotated[str, typer.Argument(help="a run directory: a local path or an fsspec URL (s3://...)")]


def _overrides(run_dir: str | None, address: str | None, executor: str | None,
               sets: list[str] | None) -> dict:
    try:
        values = parse_overrides(sets)
    except OverrideError as exc:
        raise UserError(f"--set: {exc}") from None
    if run_dir:
        values["run_dir"] = run_dir
    if address:
        values["ray.address"] = address
    if executor:
        values["executor.kind"] = executor
    return values


@app.command()
def run(
    config: ConfigArg,
    run_dir: Annotated[str | None, typer.Option(help="override run_dir")] = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster instead of starting one")] = None,
    executor: Annotated[str | None, typer.Option(help="ray (default) or local (in-process)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: a.b=value")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="after resuming, redo only the rows a stage dropped for a retryable reason "
                               "(its transient ones unless --reasons says) and what depends on them")] = False,
    reasons: Annotated[str | None, typer.Option(
        help="with --retry-failed: comma-separated reasons to retry (default: each stage's transient "
             "reasons; `pairsift plan CONFIG` lists them)")] = None,
) -> None:
    """Run (or resume) a pipeline config; finished shards are skipped."""
    from pairsift.pipeline.config import load_config
    from pairsift.pipeline.report_text import print_funnel, print_summary
    from pairsift.pipeline.retry import parse_reasons
    from pairsift.pipeline.runner import run_pipeline

    if reasons is not None and not retry_failed:
        raise UserError("--reasons only applies with --retry-failed")
    cfg = load_config(config, _overrides(run_dir, address, executor, set_))
    summary = run_pipeline(cfg, parse_reasons(reasons) if retry_failed else None)
    print_summary(summary)
    for retried in summary.retries:
        typer.echo(retried.line())
    print_funnel(cfg.run_dir)
    write_report_quietly(cfg.run_dir)
    if summary.failed:
        raise typer.Exit(1)


def write_report_quietly(run_dir: str) -> None:
    """The report is a view of the run: failing to draw it must not fail the run."""
    from pairsift.pipeline.report import write_report

    try:
        typer.echo(f"report:  {write_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - logged, never fatal
        logging.getLogger("pairsift").warning("report not written: %s", exc)


@app.command()
def report(run_dir: RunArg) -> None:
    """Write the run's self-contained HTML report to <run>/report/index.html."""
    from pairsift.pipeline.report import write_report

    typer.echo(f"report: {write_report(run_dir)}")


@app.command()
def validate(
    config: ConfigArg,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: a.b=value")] = None,
) -> None:
    """Check a config without running anything: its keys, its stages, and that its input exists."""
    from pairsift.pipeline.config import load_config

    cfg = load_config(config, _overrides(None, None, None, set_))
    _check_input_exists(cfg.input.path)
    typer.echo(f"ok: {len(cfg.stages)} stages: {', '.join(s.label for s in cfg.stages)}")


def _check_input_exists(location: str) -> None:
    """A glob must match something; a file, folder or URL must be there (a URL is asked through fsspec)."""
    from pairsift.common.storage import as_path, is_url

    if not is_url(location) and any(c in location for c in "*?["):
        import glob

        if not glob.glob(location):
            raise UserError(f"input.path {location!r}: no file matches")
        return
    try:
        exists = as_path(location).exists()
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"input.path {location!r}: cannot check it: {str(exc).splitlines()[0]}") from None
    if not exists:
        raise UserError(f"input.path {location!r}: no such file or directory")


@app.command()
def plan(
    config: ConfigArg,
    run_dir: Annotated[str | None, typer.Option(help="override run_dir")] = None,
) -> None:
    """Print the stages, their resources and what is already done in the run directory."""
    from pairsift.pipeline.config import load_config
    from pairsift.pipeline.report_text import print_plan

    print_plan(load_config(config, _overrides(run_dir, None, None, None)))


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


FormatOpt = Annotated[OutputFormat, typer.Option(
    "--format", help="table (for people: rows capped, cut to the terminal), csv, json (a list of objects) "
                     "or parquet (needs --out); csv/json/parquet hold every row and every character")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="write the result to this file instead of stdout")]

# status's columns: one row per stage; dropped_by_reason is an object in json, a map in parquet and a
# JSON object in csv (its keys vary per stage, so it is not spread over columns)
STATUS_SCHEMA = pa.schema([("stage", pa.string()), ("rows_in", pa.int64()), ("kept", pa.int64()),
                           ("dropped", pa.int64()), ("dropped_by_reason", pa.map_(pa.string(), pa.int64())),
                           ("failed_shards", pa.int64()), ("pending_shards", pa.int64())])


def _json_value(value):
    """What json.dumps cannot write itself (dates, decimals, bytes, UUIDs) goes out as text."""
    return value.hex() if isinstance(value, bytes) else str(value)


def _write_text(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--out {out}: {exc.strerror or exc}") from None


def _columns(table: pa.Table) -> list[list]:
    """Each column's Python values; a map comes back as a dict (pyarrow gives a list of pairs)."""
    columns = []
    for field, column in zip(table.schema, table.columns):
        values = column.to_pylist()
        if pa.types.is_map(field.type):
            values = [None if v is None else dict(v) for v in values]
        columns.append(values)
    return columns


def _flat(value):
    """A csv/table cell: NULL stays None; objects and lists become JSON text, as DuckDB's CLI writes
    them; bytes become hex."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_json_value, ensure_ascii=False)
    return value.hex() if isinstance(value, bytes) else value


def _emit(table: pa.Table, fmt: OutputFormat, out: Path | None) -> None:
    """Write a result in the chosen format: the human table, or every row for a program to read."""
    if fmt is OutputFormat.parquet:
        if out is None:
            raise UserError("--format parquet writes a file: give --out FILE.parquet")
        try:
            pq.write_table(table, out)
        except OSError as exc:
            raise UserError(f"--out {out}: {str(exc).splitlines()[0]}") from None
        return
    rows = list(zip(*_columns(table))) if table.num_columns else []
    if fmt is OutputFormat.json:
        records = [dict(zip(table.column_names, row)) for row in rows]
        _write_text(json.dumps(records, default=_json_value, ensure_ascii=False) + "\n", out)
    elif fmt is OutputFormat.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_flat(v) for v in row] for row in rows)
        _write_text(buffer.getvalue(), out)
    else:
        from pairsift.pipeline.report_text import print_table

        if out is not None:
            raise UserError("--out needs --format csv, json or parquet (a table is for the terminal)")
        print_table(table.column_names, [tuple(_flat(v) for v in row) for row in rows])


def _status_table(run_dir: str) -> pa.Table:
    from pairsift.pipeline.catalog import funnel

    rows = [{"stage": s.label, "rows_in": s.rows_in, "kept": s.kept, "dropped": sum(s.dropped.values()),
             "dropped_by_reason": sorted(s.dropped.items(), key=lambda kv: -kv[1]),
             "failed_shards": len(s.failed_shards), "pending_shards": s.pending_shards} for s in funnel(run_dir)]
    return pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)


@app.command()
def status(run_dir: RunArg, fmt: FormatOpt = OutputFormat.table, out: OutOpt = None) -> None:
    """Print the funnel of a run: rows in, kept, dropped by reason, per stage."""
    if fmt is OutputFormat.table and out is None:
        from pairsift.pipeline.report_text import print_funnel

        print_funnel(run_dir)
        return
    _emit(_status_table(run_dir), fmt, out)


@app.command()
def query(run_dir: RunArg, sql: Annotated[str, typer.Argument(help="DuckDB SQL; views: samples, <stage>...")],
          fmt: FormatOpt = OutputFormat.table, out: OutOpt = None) -> None:
    """Run SQL over the run's catalog (a view per stage and a `samples` view joining them)."""
    import duckdb

    from pairsift.pipeline.catalog import open_catalog

    con = open_catalog(run_dir)
    try:
        relation = con.sql(sql)
        result = pa.table({}) if relation is None else relation.to_arrow_table()  # None: not a SELECT
    except duckdb.Error as exc:
        raise UserError(f"query failed: {str(exc).splitlines()[0]}") from None
    _emit(result, fmt, out)


@app.command()
def verify(run_dir: RunArg) -> None:
    """Check a finished run from disk: tars vs parquet, sizes.json, unique uids, per-stage row accounting."""
    from pairsift.pipeline.verify import verify_run

    report = verify_run(run_dir)
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    checked = ", ".join(f"{n:,} {what}" for what, n in report.checked.items())
    typer.echo(f"{'ok' if report.ok else 'FAILED'}: checked {checked}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def subset(
    run_dir: RunArg,
    out: Annotated[str, typer.Option(help="directory for the new shards (new, or an earlier subset's); a path or URL")],
    uids: Annotated[Path | None, typer.Option(help="uids: one per line, or a parquet/csv with a uid column")] = None,
    urls: Annotated[Path | None, typer.Option(help="urls: one per line, or a parquet/csv with a url column")] = None,
    exclude: Annotated[bool, typer.Option("--exclude", help="keep every sample except the listed ones")] = False,
) -> None:
    """Write new shards (tar + parquet + sizes.json) from a run's shards: no download, no decode."""
    from pairsift.pipeline.maintenance import subset as make_subset

    typer.echo(make_subset(run_dir, uids, urls, exclude, out).line())


@app.command()
def takedown(
    run_dir: RunArg,
    urls: Annotated[Path, typer.Option(help="urls to remove: one per line, or a parquet/csv with a url column")],
) -> None:
    """Remove samples by url from a finished run in place (shards, stored images, catalog) and log them."""
    from pairsift.pipeline.maintenance import takedown as take_down

    typer.echo(take_down(run_dir, urls).line())


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="output directory")],
    n: Annotated[int, typer.Option(help="pool rows")] = 10_000,
    seed: Annotated[int, typer.Option()] = 0,
    base_url: Annotated[str, typer.Option(help="where `pairsift serve` will serve it")] = "http://127.0.0.1:8765",
) -> None:
    """Draw a synthetic web corpus with known concepts, defects and a separate ground truth."""
    from pairsift.pipeline.synth import synthesize

    summary = synthesize(out, n=n, seed=seed, base_url=base_url)
    typer.echo(f"wrote {out}: {summary}")


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(help="a directory written by `pairsift synth`")],
    port: Annotated[int, typer.Option()] = 8765,
    host: Annotated[str, typer.Option(help="a loopback address")] = "127.0.0.1",
) -> None:
    """Serve a synthetic corpus over HTTP on 127.0.0.1 until Ctrl-C."""
    from pairsift.pipeline.serve import serve_forever

    serve_forever(directory, host, port)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the corpus and the run go")] = Path("runs/demo"),
    size: Annotated[str, typer.Option(help="tiny | small | default | large")] = "default",
    seed: Annotated[int, typer.Option()] = 0,
    executor: Annotated[str, typer.Option(help="ray or local")] = "ray",
    threads: Annotated[int | None, typer.Option(help="torch threads per training (1 on a busy machine)")] = None,
    ablations: Annotated[bool, typer.Option(help="also train on filter-only and balance-only curation")] = False,
    port: Annotated[int, typer.Option(help="127.0.0.1 port the synthetic web is served on (part of every URL)")] = 8766,
) -> None:
    """Prove what curation buys: synthesize a web, train a filter network, curate on local Ray, then
    train the same CLIP on the raw pool and on the curated shards and compare them on a clean test set."""
    from pairsift.pipeline.demo import run_demo

    run_demo(out, size=size, seed=seed, executor=executor, threads=threads, ablations=ablations, port=port)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="a trainer config, e.g. configs/train/tiny.yaml")],
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint in `out`")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: a.b=value")] = None,
) -> None:
    """Train an open_clip model on webdataset shards (--set KEY=VALUE, or bare KEY=VALUE arguments)."""
    from pairsift.trainer.cli import train_command
    from pairsift.trainer.config import ConfigError

    try:
        train_command(config, resume=resume, overrides=[*(set_ or []), *ctx.args])
    except ConfigError as exc:
        raise UserError(str(exc)) from None


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="a model directory written by `pairsift train` (…/final)")],
    data: Annotated[Path, typer.Argument(help="held-out webdataset dir (classnames.json, templates.json) or image folder")],
    out: Annotated[Path | None, typer.Option(help="write the results as JSON here")] = None,
) -> None:
    """Zero-shot top-1/top-5 and image<->text retrieval recall of a trained model."""
    from pairsift.trainer.cli import eval_command
    from pairsift.trainer.config import ConfigError

    try:
        eval_command(checkpoint, data, out)
    except (ConfigError, FileNotFoundError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None


@metadata_app.command("build")
def metadata_build(
    out: Annotated[Path, typer.Option(help="output file: .parquet, .json or .txt")],
    wordnet_dir: Annotated[Path | None, typer.Option(help="WordNet dict dir (default /usr/share/wordnet)")] = None,
    unigrams: Annotated[int, typer.Option(help="most frequent English words to add")] = 250_000,
    bigrams: Annotated[int, typer.Option(help="most associated word pairs to add")] = 100_000,
) -> None:
    """Build a MetaCLIP-style entry list offline from WordNet and word frequencies."""
    from pairsift.stages.metadata import build_metadata

    try:
        summary = build_metadata(out, wordnet_dir=wordnet_dir, n_unigrams=unigrams, n_bigrams=bigrams)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    typer.echo(f"wrote {summary.path}: {summary.n_entries:,} entries ({summary.by_source})")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # libraries (open_clip) chat at INFO
    logging.getLogger("pairsift").setLevel(logging.INFO)
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
