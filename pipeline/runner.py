"""Run a config end to end: ingest, each stage over its pending shards, then the training shards.

Resume is the default: a piece of work is skipped when its marker carries the expected config hash
and the versions of the exact upstream parts it was computed from. Editing a stage's config changes
its hash and every later one (see ``RunConfig.stage_hashes``), so that stage and the ones after it
are redone and nothing before it. A shard that still fails after its retries is recorded with its
error; later stages skip it, the run finishes the rest and says so.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from pairsift.common.storage import is_remote, read_parquet, remove
from pairsift.pipeline.config import RunConfig, config_hash
from pairsift.pipeline.contracts import abort_shares, bulky_columns, caption_columns
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.executor import Job, JobResult, LocalExecutor, RayExecutor, WorkerSpec, make_executor
from pairsift.pipeline.run_dir import RunDir, ShardDone, ShardFailed, shard_of, write_atomic
from pairsift.pipeline.shard_runner import ShardRunner, write_image_tar
from pairsift.pipeline.shards import ShardWriter, plan_output_shards, remove_stale_shards, write_sizes
from pairsift.stages import stage_class, stage_path
from pairsift.stages.base import IMAGE, PoolStage, Stage
from pairsift.stages.ingest import iter_input_shards
from pairsift.stages.readers import INGEST_REASON, TarLimits

log = logging.getLogger("pairsift")


@dataclass
class StageReport:
    label: str
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: dict[int, str] = field(default_factory=dict)
    shards_blocked: int = 0
    rows: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class RunSummary:
    run_dir: str
    n_input_shards: int
    stages: list[StageReport]
    output_shards: int
    samples_written: int
    retries: list = field(default_factory=list)  # pipeline.retry.RetryReport, one per stage retried

    @property
    def failed(self) -> dict[str, dict[int, str]]:
        return {s.label: s.shards_failed for s in self.stages if s.shards_failed}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("pairsift", "ray", "pyarrow", "img2dataset", "open_clip_torch", "torch", "duckdb"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# --- ingest ----------------------------------------------------------------------------------

def ingest(cfg: RunConfig, run: RunDir, ingest_hash: str) -> int:
    """Cut the input into shards (skipped when a finished ingest with the same hash exists)."""
    manifest_path = run.manifest
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest["config_hash"] == ingest_hash:
            return int(manifest["n_shards"])
    except (OSError, ValueError, KeyError):
        pass
    started, rows, usable, n_shards = time.perf_counter(), 0, 0, 0
    problems: Counter[str] = Counter()
    source = cfg.input
    try:
        shards = iter_input_shards(source.path, source.format, source.url_col, source.caption_col,
                                   source.shard_size, spread_domains=source.spread_domains,
                                   spill_dir=None if is_remote(run.root) else run.root,
                                   limits=TarLimits(source.max_member_bytes, source.max_tar_bytes))
        with tqdm(desc="ingest", unit=" rows", leave=False) as bar:
            for index, table in enumerate(shards):
                path = run.part("ingest", index)
                usable += _usable_rows(table)
                problems.update(r for r in table.column(INGEST_REASON).to_pylist() if r)
                if IMAGE in table.column_names:
                    write_image_tar(run.images("ingest", index), table, Stage.sample_json)
                    table = table.drop_columns([IMAGE])
                write_atomic(path, table)
                run.mark_done(path, ShardDone(config_hash=ingest_hash, rows_in=table.num_rows,
                                              kept=table.num_rows))
                rows += table.num_rows
                n_shards = index + 1
                bar.update(table.num_rows)
    except ValueError as exc:  # one line, whatever the input put into the message
        raise UserError(" ".join(str(exc).split())) from None
    if rows == 0:
        raise UserError(f"input {source.path} has no rows: nothing to curate")
    if usable == 0:  # every row would be dropped: say so now, not after a run that writes nothing
        raise UserError(f"input {source.path}: none of its {rows:,} rows has a url (column {source.url_col!r} "
                        "is empty or null in every row) or an image: nothing to curate; check input.url_col")
    for stale in run.parts("ingest"):
        if shard_of(stale) >= n_shards:
            remove(stale)
            remove(run.done_of(stale))
    _say_input_problems(problems, rows, source.path)
    write_atomic(manifest_path, json.dumps({"config_hash": ingest_hash, "n_shards": n_shards, "rows": rows,
                                            "ingest_reasons": dict(problems)}))
    log.info("ingest: %d rows in %d shards (%.0f rows/s)", rows, n_shards, rows / (time.perf_counter() - started))
    return n_shards


def _say_input_problems(problems: Counter[str], rows: int, path: str) -> None:
    """One line per kind of damaged input row (they stay in the run; ``ingest_reason`` says which)."""
    for reason, count in problems.most_common():
        everything = " (every row: check the input's encoding or format)" if count == rows else ""
        log.warning("ingest: %s: %d of %d rows have ingest_reason %s%s", path, count, rows, reason, everything)


def _usable_rows(table: pa.Table) -> int:
    """Rows with a url to fetch, or an image already (webdataset input)."""
    usable = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(table.column("url"))), 0), False)
    if IMAGE in table.column_names:
        usable = pc.or_(usable, pc.is_valid(table.column(IMAGE)))
    return pc.sum(usable).as_py() or 0


# --- stages ----------------------------------------------------------------------------------

class RunAborted(UserError):
    """The run stopped on purpose (e.g. the resolver is failing); finished shards are kept."""


class StageRun:
    """Runs one stage (or the shard writer) over the shards that are not done yet."""

    def __init__(self, run: RunDir, executor: LocalExecutor | RayExecutor, upstream: list[str],
                 abort_on_reason: dict[str, float] | None = None, abort_min_rows: int = 1000):
        self.run = run
        self.executor = executor
        self.upstream = upstream
        self.abort_on_reason = abort_on_reason or {}
        self.abort_min_rows = abort_min_rows
        self.reason_counts: dict[str, int] = {}

    def check_abort(self, desc: str, done: ShardDone, rows: int) -> None:
        for reason, count in done.dropped.items():
            self.reason_counts[reason] = self.reason_counts.get(reason, 0) + count
        if rows < self.abort_min_rows:
            return
        for reason, limit in self.abort_on_reason.items():
            share = self.reason_counts.get(reason, 0) / rows
            if share > limit:
                raise RunAborted(
                    f"stopping {desc}: {share:.0%} of the first {rows:,} rows failed with {reason} "
                    f"(limit {limit:.0%}); that is the environment failing (e.g. the DNS resolver), not the "
                    "data. Fix it and rerun the same command: finished shards are kept"
                )

    def upstream_versions(self, shard: int) -> list[str] | None:
        found = [self.run.version_of(self.run.part(label, shard)) for label in self.upstream]
        return None if None in found else found  # type: ignore[return-value]

    def execute(self, desc: str, spec: WorkerSpec, jobs: list[Job], report: StageReport,
                path_of: Any, config_hash: str) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        with tqdm(total=len(jobs), desc=desc, unit=" shard", leave=False) as bar:
            def on_result(result: JobResult) -> None:
                path = path_of(result.job.shard)
                if result.ok:
                    done: ShardDone = result.value
                    if result.job.attempts > 1:  # the worker wrote attempts=1: it never saw the attempts that died
                        done = record_attempts(self.run, path, done, result)
                    report.shards_done += 1
                    report.rows += done.rows_in
                    self.check_abort(desc, done, report.rows)
                else:
                    report.shards_failed[result.job.shard] = result.error or "failed"
                    self.run.mark_failed(path, ShardFailed(config_hash=config_hash, error=result.error or "",
                                                           attempts=result.job.attempts))
                    log.warning("%s: shard %d failed after %d attempts: %s", desc, result.job.shard,
                                result.job.attempts, result.error)
                bar.update(1)
                elapsed = time.perf_counter() - started
                bar.set_postfix(rows=f"{report.rows:,}", rows_per_s=f"{report.rows / elapsed:,.0f}" if elapsed else "-")
            self.executor.map(spec, jobs, on_result)
        report.seconds += time.perf_counter() - started


def record_attempts(run: RunDir, path, done: ShardDone, result: JobResult) -> ShardDone:
    """Put the attempts that failed before this one (a killed worker, a deadline) into the marker."""
    lost = Counter(f"attempt failed: {e.splitlines()[0][:200]}" for e in result.errors if e)
    done = done.model_copy(update={"attempts": result.job.attempts, "errors": dict(Counter(done.errors) + lost)})
    run.mark_done(path, done)
    return done


def run_stage(cfg: RunConfig, run: RunDir, executor, n_shards: int, index: int, hashes: dict[str, str]) -> StageReport:
    spec = cfg.stages[index]
    label, stage_hash = spec.label, hashes[spec.label]
    upstream = cfg.labels()[:index + 1]
    cls = stage_class(spec.stage)
    stage = cls(spec.config)
    runner_kwargs = {"run_root": str(run.root), "stage_path": stage_path(spec.stage), "config": spec.config.model_dump(),
                     "label": label, "upstream": upstream}
    worker = WorkerSpec(ShardRunner, runner_kwargs, stage.resources, cls.stateful)
    report = StageReport(label)
    stage_run = StageRun(run, executor, upstream, abort_shares([spec], cfg.executor.abort_on_reason),
                         cfg.executor.abort_min_rows)

    def pending(path_of, extra: list[str] | None = None) -> list[tuple[int, list[str]]]:
        todo = []
        for shard in range(n_shards):
            versions_ = stage_run.upstream_versions(shard)
            if versions_ is None:
                report.shards_blocked += 1
                continue
            versions_ = versions_ + (extra or [])
            if run.is_done(path_of(shard), stage_hash, versions_):
                report.shards_skipped += 1
                continue
            todo.append((shard, versions_))
        return todo

    if not isinstance(stage, PoolStage):
        todo = pending(lambda s: run.part(label, s))
        jobs = [Job(s, "run_part", (stage_hash, v)) for s, v in todo]
        stage_run.execute(label, worker, jobs, report, lambda s: run.part(label, s), stage_hash)
        return report

    todo = pending(lambda s: run.partial(label, s))
    stage_run.execute(f"{label} (partial)", worker, [Job(s, "run_partial", (stage_hash, v)) for s, v in todo],
                      report, lambda s: run.partial(label, s), stage_hash)
    report.shards_skipped = report.shards_blocked = 0
    fitted, fit_version = fit_pool_stage(stage, run, label, stage_hash, n_shards)
    todo = pending(lambda s: run.part(label, s), [fit_version])
    report.rows = 0
    shared_fit = executor.share(fitted)  # one copy in Ray's object store, not one per job
    stage_run.execute(label, worker, [Job(s, "run_apply", (stage_hash, v, shared_fit)) for s, v in todo],
                      report, lambda s: run.part(label, s), stage_hash)
    return report


class StoredPartials(Sequence):
    """The per-shard summaries, read from disk one at a time: a fit over a billion-row pool never
    holds more than one shard's summary (a fit may iterate them as often as it needs)."""

    def __init__(self, paths: list):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [read_parquet(p) for p in self.paths[index]]
        return read_parquet(self.paths[index])


def fit_pool_stage(stage: PoolStage, run: RunDir, label: str, stage_hash: str, n_shards: int):
    """Fit over every shard's summary; reuse the saved fit when its inputs have not changed."""
    partial_versions = []
    for shard in range(n_shards):
        version = run.version_of(run.partial(label, shard))
        if version is not None:
            partial_versions.append(version)
    fit_path = run.fit(label)
    try:
        saved = json.loads(fit_path.read_text())
        if saved["config_hash"] == stage_hash and saved["upstream"] == partial_versions:
            fitted = dict(saved["values"])
            for name in saved["tables"]:
                fitted[name] = read_parquet(run.fit_table(label, name))
            return fitted, saved["version"]
    except (OSError, ValueError, KeyError):
        pass
    partials = StoredPartials([run.partial(label, s) for s in range(n_shards)
                               if run.version_of(run.partial(label, s)) is not None])
    fitted = stage.fit(partials)
    tables = {k: v for k, v in fitted.items() if isinstance(v, pa.Table)}
    for name, table in tables.items():
        write_atomic(run.fit_table(label, name), table)
    values = {k: v for k, v in fitted.items() if k not in tables}
    version = config_hash({"hash": stage_hash, "upstream": partial_versions, "values": values})
    write_atomic(fit_path, json.dumps({"config_hash": stage_hash, "upstream": partial_versions, "version": version,
                                       "values": values, "tables": sorted(tables)}, default=str))
    return fitted, version


# --- final shards ----------------------------------------------------------------------------

def write_output_shards(cfg: RunConfig, run: RunDir, executor, n_shards: int, shards_hash: str) -> tuple[StageReport, int, int]:
    upstream = cfg.labels()
    last = upstream[-1]
    report = StageReport("shards")
    kept: dict[int, int] = {}
    last_versions: dict[int, str] = {}
    for shard in range(n_shards):
        done = run.read_done(run.part(last, shard))
        if done is None:
            report.shards_blocked += 1
            continue
        kept[shard] = done.kept
        last_versions[shard] = done.version
    plan = plan_output_shards(kept, cfg.shards.samples_per_shard)
    remove_stale_shards(run, len(plan))
    jobs = []
    for index, slices in enumerate(plan):
        upstream_versions = [f"{s}:{a}:{b}:{last_versions[s]}" for s, a, b in slices]
        if run.is_done(run.shards.tar(index), shards_hash, upstream_versions):
            report.shards_skipped += 1
            continue
        jobs.append(Job(index, "write", (slices, shards_hash, upstream_versions)))
    worker = WorkerSpec(ShardWriter, {"run_root": str(run.root), "upstream": upstream,
                                      "json_columns": cfg.shards.json_columns,
                                      "max_caption_tokens": cfg.shards.max_caption_tokens,
                                      "long_captions": cfg.shards.long_captions,
                                      "caption_columns": caption_columns(cfg.stages),
                                      "bulky_columns": bulky_columns(cfg.stages)})
    StageRun(run, executor, upstream).execute(
        "shards", worker, jobs, report, run.shards.tar, shards_hash)
    sizes = write_sizes(run, len(plan))
    return report, len(plan), sum(sizes.values())


# --- the whole run ---------------------------------------------------------------------------

def run_pipeline(cfg: RunConfig, retry_reasons: Sequence[str] | None = None) -> RunSummary:
    """Run or resume ``cfg``. With ``retry_reasons`` (``()``: each stage's transient reasons), after
    each stage with retryable reasons has resumed, redo only its rows that failed for those reasons
    (``pipeline.retry``); later stages then redo exactly the shards whose part changed."""
    from pairsift.pipeline.retry import check_retry, reasons_for, retry_failed_rows

    run = RunDir(cfg.run_dir)
    retry = check_retry(cfg, run, retry_reasons) if retry_reasons is not None else None  # before writing anything
    run.create()
    run.remove_temp_files()  # left by writers killed in an earlier attempt: never under a final name
    hashes = cfg.stage_hashes()
    started = time.time()
    meta = {"config": cfg.to_json(), "stage_hashes": hashes, "versions": versions(), "started_at": started}
    run.write_run_json(meta | {"status": "running"})
    n_shards = ingest(cfg, run, hashes["ingest"])
    executor = make_executor(cfg.executor, cfg.ray)
    reports, retries = [], []
    for index, spec in enumerate(cfg.stages):
        report = run_stage(cfg, run, executor, n_shards, index, hashes)
        reports.append(report)
        if retry is not None and (mine := reasons_for(spec, retry)):
            retries.append(retry_failed_rows(cfg, run, executor, n_shards, index, hashes, mine))
            report.shards_failed.update(retries[-1].shards_failed)
            log.info("%s", retries[-1].line())
        log.info("%s: %d shards run, %d already done, %d failed, %d blocked; %.0f rows/s",
                 spec.label, report.shards_done, report.shards_skipped, len(report.shards_failed),
                 report.shards_blocked, report.rows_per_s)
    shard_report, n_out, samples = write_output_shards(cfg, run, executor, n_shards, hashes["shards"])
    reports.append(shard_report)
    summary = RunSummary(str(run.root), n_shards, reports, n_out, samples, retries)
    failed = summary.failed
    meta.update(status="failed_shards" if failed else "finished", finished_at=time.time(),
                output_shards=n_out, samples_written=samples,
                stage_runs=[{"label": r.label, "shards_done": r.shards_done, "shards_skipped": r.shards_skipped,
                             "shards_failed": r.shards_failed, "shards_blocked": r.shards_blocked,
                             "rows": r.rows, "seconds": round(r.seconds, 3), "rows_per_s": round(r.rows_per_s, 1)}
                            for r in reports])
    if retries:
        meta["retries"] = [r.as_dict() for r in retries]
    run.remove_temp_files()
    run.write_run_json(meta)
    return summary
