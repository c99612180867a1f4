"""The ``pairsift`` command: a thin shell over functions that tests call directly.

Every error a user can cause ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

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
    values: dict = {}
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set input.shard_size=1000")
        key, raw = item.split("=", 1)
        import yaml

        values[key] = yaml.safe_load(raw)
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
        "--retry-failed", help="after resuming, re-fetch only the rows whose download failed (transient "
                               "reasons unless --reasons says) and redo what depends on them")] = False,
    reasons: Annotated[str | None, typer.Option(
        help="with --retry-failed: comma-separated download reasons to retry "
             "(default timeout,dns_error,failed_to_download,domain_unavailable,rate_limited)")] = None,
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
def validate(config: ConfigArg) -> None:
    """Check a config without running anything."""
    from pairsift.pipeline.config import load_config

    cfg = load_config(config)
    typer.echo(f"ok: {len(cfg.stages)} stages: {', '.join(s.label for s in cfg.stages)}")


@app.command()
def plan(
    config: ConfigArg,
    run_dir: Annotated[str | None, typer.Option(help="override run_dir")] = None,
) -> None:
    """Print the stages, their resources and what is already done in the run directory."""
    from pairsift.pipeline.config import load_config
    from pairsift.pipeline.report_text import print_plan

    print_plan(load_config(config, _overrides(run_dir, None, None, None)))


@app.command()
def status(run_dir: RunArg) -> None:
    """Print the funnel of a run: rows in, kept, dropped by reason, per stage."""
    from pairsift.pipeline.report_text import print_funnel

    print_funnel(run_dir)


@app.command()
def query(run_dir: RunArg, sql: Annotated[str, typer.Argument(help="DuckDB SQL; views: samples, <stage>...")]) -> None:
    """Run SQL over the run's catalog (a view per stage and a `samples` view joining them)."""
    from pairsift.pipeline.catalog import query as run_query
    from pairsift.pipeline.report_text import print_table

    columns, rows = run_query(run_dir, sql)
    print_table(columns, rows)


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
) -> None:
    """Train an open_clip model on webdataset shards (KEY=VALUE arguments override config keys)."""
    from pairsift.trainer.cli import train_command
    from pairsift.trainer.config import ConfigError

    try:
        train_command(config, resume=resume, overrides=list(ctx.args))
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
