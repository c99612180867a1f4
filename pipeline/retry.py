"""Retry only what failed: re-run a stage on the rows it dropped for reasons its contract calls retryable.

``pairsift run CONFIG --retry-failed [--reasons timeout,...]`` first resumes the run as usual, then,
for each stage with retryable reasons (download's transient network failures), re-runs the stage
on just the rows of each finished shard whose reason is in the retry set. The shard's part is rewritten with the same rows in the same order (later stages
join on position), the retried rows' columns replaced by their new result; its image tar is rewritten
with the old images and the new ones in row order; its marker gets a new version. Shards with
nothing to retry keep their marker, so the stages after download redo exactly the shards whose
download part changed. One line per retried shard goes to ``<run>/<label>/_markers/retries.jsonl``.

A retried shard is replaced in this order: old marker removed, tar, part, new marker. A crash
anywhere in between leaves a shard without a marker, which the next run redoes whole: never a part
that disagrees with its marker (the stages after it would trust the marker and misjoin).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from pairsift.common.storage import AnyPath, is_remote, read_parquet, remove
from pairsift.common.tars import TarWriter, members_of, split_name, write_tar
from pairsift.pipeline.config import RunConfig, StageSpec
from pairsift.pipeline.contracts import contract_of
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.executor import Job, JobResult, WorkerSpec
from pairsift.pipeline.maintenance import taken_down_uids
from pairsift.pipeline.run_dir import RunDir, ShardDone, ShardFailed, write_atomic
from pairsift.pipeline.shard_runner import (
    ShardRunner,
    check_output,
    load_input,
    samples,
    summarise,
    tar_stats_path,
)
from pairsift.stages import stage_class, stage_path
from pairsift.stages.base import REASON, Contract

log = logging.getLogger("pairsift")


def parse_reasons(text: str | None) -> tuple[str, ...]:
    """``--reasons a,b`` as a tuple; ``()`` (not given) means each stage's own default set.
    Checked against the stages' contracts by ``check_retry``."""
    if text is None:
        return ()
    reasons = tuple(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    if not reasons:
        raise UserError("--reasons: no reason given; leave it out for each stage's transient reasons")
    return reasons


def retry_stages(cfg: RunConfig) -> list[tuple[StageSpec, Contract]]:
    """The stages whose contract says some of their drops a later attempt may cure."""
    return [(spec, c) for spec in cfg.stages if (c := contract_of(spec)).retryable or c.retryable_on_request]


def check_retry(cfg: RunConfig, run: RunDir, reasons: Collection[str]) -> frozenset[str]:
    """Refuse, in one line, a retry that cannot mean what the user wants; return the reason set."""
    stages = retry_stages(cfg)
    if not stages:
        names = ", ".join(s.label for s in cfg.stages) or "none"
        raise UserError(f"--retry-failed: no stage of the config has retryable reasons (stages: {names}); "
                        "nothing to retry")
    retryable = tuple(dict.fromkeys(r for _, c in stages for r in (*c.retryable, *c.retryable_on_request)))
    final = {reason: why for _, c in stages for reason, why in c.final.items()}
    reasons = tuple(reasons) or tuple(dict.fromkeys(r for _, c in stages for r in c.retryable))
    for reason in reasons:
        if reason in final:
            raise UserError(f"--reasons: {reason} is never retried: {final[reason]}")
        if reason not in retryable:
            raise UserError(f"--reasons: unknown reason {reason!r}; retryable: {', '.join(retryable)}")
    if not run.run_json.exists():
        raise UserError(f"--retry-failed: {run.root} has never run (no run.json); "
                        "run `pairsift run` without --retry-failed first")
    hashes = cfg.stage_hashes()
    for spec, _ in stages:
        label = spec.label
        finished = current = False
        for part in run.parts(label):
            done = run.read_done(part)
            finished = finished or done is not None
            if done is not None and done.config_hash == hashes[label]:
                current = True
                break
        if not finished:
            raise UserError(f"--retry-failed: no {label} shard has finished in {run.root} yet: nothing to retry; "
                            "run without --retry-failed")
        if not current:
            raise UserError(f"--retry-failed: the config of {label} (or of a stage before it) changed since "
                            f"{run.root} ran, so the whole stage would be redone; run without --retry-failed "
                            "to do that")
    return frozenset(reasons)


def reasons_for(spec: StageSpec, reasons: frozenset[str]) -> frozenset[str]:
    """The part of the retry set that this stage can drop with."""
    contract = contract_of(spec)
    return reasons & {*contract.retryable, *contract.retryable_on_request}


# --- one shard, on a worker ----------------------------------------------------------------------

@dataclass
class RetryOutcome:
    shard: int
    retried: int = 0
    succeeded: int = 0
    by_reason: dict[str, list[int]] = field(default_factory=dict)  # old reason -> [retried, now succeeded]
    still_failing: dict[str, int] = field(default_factory=dict)  # new reason -> rows
    seconds: float = 0.0
    version_before: str | None = None
    done: ShardDone | None = None  # None: nothing was retried (or the shard changed under us)


class RetryRunner(ShardRunner):
    """A ShardRunner that re-runs its stage on a shard's failed rows only."""

    def retry_part(self, shard: int, config_hash: str, version: str, reasons: list[str]) -> RetryOutcome:
        """Patch the part whose marker has ``version``: its rows failed for ``reasons`` are fetched again."""
        started = time.perf_counter()
        part_path = self.run.part(self.label, shard)
        before = self.run.read_done(part_path)
        outcome = RetryOutcome(shard, version_before=before.version if before else None)
        if before is None:  # only an earlier attempt of this job removes it, and then it failed midway
            raise RuntimeError(f"{self.label} shard {shard}: its marker is gone (an earlier retry stopped "
                               "midway); the next run redoes the shard whole")
        if before.config_hash != config_hash or before.version != version:
            return outcome  # redone since the driver planned: not the part it meant
        part = read_parquet(part_path)
        rows = self._rows_to_retry(part, set(reasons))
        if not rows:
            return outcome
        given = load_input(self.run, self.upstream, shard)
        if given.column("uid") != part.column("uid"):
            raise RuntimeError(f"{self.label} shard {shard}: its part does not line up with its input; "
                               "rerun without --retry-failed")
        subset = given.take(pa.array(rows, pa.int64()))
        output = check_output(self.stage, self.contract, subset, self.stage(subset))
        fresh = output.select(part.column_names).cast(part.schema)
        merged = merge_rows(part, fresh, rows)
        new_samples = dict(samples(output, self.stage.sample_json))
        seconds = time.perf_counter() - started
        done = ShardDone(config_hash=config_hash, upstream=before.upstream, attempts=before.attempts,
                         **summarise(merged, before.seconds + seconds))
        if new_samples:
            remove(self.run.done_of(part_path))  # from here until the new marker, the shard is "not done"
            rewrite_image_tar(self.run.images(self.label, shard), given, new_samples,
                              set(subset.column("uid").to_pylist()))
        else:
            # Every retried row failed again (its reason and error are updated): the rows later stages
            # see are exactly the same, so their work stays valid and the version stays too.
            done.version = before.version
        write_atomic(part_path, merged)
        stats = self.stage.tar_stats(merged, time.time() - seconds, time.time())
        if stats is not None:  # the statuses changed, so does the shard's stats file
            write_atomic(tar_stats_path(self.run, self.label, shard), json.dumps(stats, indent=4))
        self.run.mark_done(part_path, done)
        old = part.column(REASON).take(pa.array(rows, pa.int64())).to_pylist()
        new = fresh.column(REASON).to_pylist()
        for was, now in zip(old, new):
            counts = outcome.by_reason.setdefault(was, [0, 0])
            counts[0] += 1
            counts[1] += now is None
            if now is not None:
                outcome.still_failing[now] = outcome.still_failing.get(now, 0) + 1
        outcome.retried, outcome.succeeded = len(rows), sum(n is None for n in new)
        outcome.seconds, outcome.done = seconds, done
        return outcome

    def _rows_to_retry(self, part: pa.Table, reasons: set[str]) -> list[int]:
        """Positions of rows failed for one of ``reasons``; never a row a takedown removed."""
        mask = pc.is_in(part.column(REASON), pa.array(sorted(reasons), pa.string())).fill_null(False)
        taken_down = taken_down_uids(self.run.root)
        if taken_down:
            mask = pc.and_(mask, pc.invert(pc.is_in(part.column("uid"), pa.array(sorted(taken_down), pa.string()))))
        return pc.indices_nonzero(mask).to_pylist()


def merge_rows(part: pa.Table, fresh: pa.Table, rows: list[int]) -> pa.Table:
    """``part`` with row ``rows[i]`` replaced by ``fresh`` row i: same rows, same order."""
    order = list(range(part.num_rows))
    for i, row in enumerate(rows):
        order[row] = part.num_rows + i
    return pa.concat_tables([part, fresh]).take(pa.array(order, pa.int64())).combine_chunks()


def rewrite_image_tar(path: AnyPath, given: pa.Table, new_samples: dict[str, list[tuple[str, bytes]]],
                      retried: set[str]) -> None:
    """The shard's image tar with the retried rows' new samples (``shard_runner.samples``) added,
    every sample in row order (as ``write_image_tar`` would have written it had they succeeded the
    first time). The old tar is streamed member by member (a remote tar is never held whole)."""
    uids = given.column("uid").to_pylist()
    position = {uid: i for i, uid in enumerate(uids)}
    pending = sorted(position[uid] for uid in new_samples)  # new samples, by row
    next_new = 0

    def add_new(tar: TarWriter, before: float) -> None:
        nonlocal next_new
        while next_new < len(pending) and pending[next_new] < before:
            tar.add_sample(new_samples[uids[pending[next_new]]])
            next_new += 1

    with write_tar(path) as tar:
        for member in members_of(path) if path.exists() else ():
            key = split_name(member.name)[0]
            if key in retried:
                continue  # a failed row has no image; should one be there, the new result replaces it
            add_new(tar, position.get(key, -1))  # an unknown key stays where it was
            tar.copy(member)
        add_new(tar, float("inf"))


# --- the pass over a stage, on the driver --------------------------------------------------------

@dataclass
class RetryReport:
    label: str
    reasons: list[str]
    shards_retried: int = 0
    shards_untouched: int = 0
    shards_failed: dict[int, str] = field(default_factory=dict)
    rows_retried: int = 0
    rows_succeeded: int = 0
    by_reason: dict[str, list[int]] = field(default_factory=dict)
    still_failing: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, outcome: RetryOutcome) -> None:
        self.shards_retried += outcome.done is not None
        self.shards_untouched += outcome.done is None
        self.rows_retried += outcome.retried
        self.rows_succeeded += outcome.succeeded
        for reason, (tried, ok) in outcome.by_reason.items():
            counts = self.by_reason.setdefault(reason, [0, 0])
            counts[0], counts[1] = counts[0] + tried, counts[1] + ok
        self.still_failing.update(outcome.still_failing)

    def line(self) -> str:
        detail = ", ".join(f"{r} {ok}/{n}" for r, (n, ok) in sorted(self.by_reason.items()))
        text = (f"{self.label} retry ({','.join(self.reasons)}): {self.rows_retried:,} rows in {self.shards_retried} "
                f"shards re-fetched, {self.rows_succeeded:,} now downloaded"
                + (f" ({detail})" if detail else "")
                + f"; {self.shards_untouched} shards untouched")
        if self.still_failing:
            text += "; still failing: " + ", ".join(f"{r}={n:,}" for r, n in self.still_failing.most_common())
        if self.shards_failed:
            text += f"; {len(self.shards_failed)} shards FAILED (rerun the same command)"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "reasons": self.reasons, "shards_retried": self.shards_retried,
                "shards_untouched": self.shards_untouched, "shards_failed": self.shards_failed,
                "rows_retried": self.rows_retried, "rows_succeeded": self.rows_succeeded,
                "by_reason": self.by_reason, "still_failing": dict(self.still_failing),
                "seconds": round(self.seconds, 3)}


class RetryLog:
    """``retries.jsonl``: appended line by line on a local disk; on an object store (no appends)
    written once, whole, when the pass ends."""

    def __init__(self, path: AnyPath):
        self.path = path
        self.buffered: list[str] = []

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        if is_remote(self.path):
            self.buffered.append(line)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)

    def close(self) -> None:
        if self.buffered:
            old = self.path.read_text() if self.path.exists() else ""
            write_atomic(self.path, old + "".join(self.buffered))
            self.buffered.clear()


def retry_failed_rows(cfg: RunConfig, run: RunDir, executor, n_shards: int, index: int, hashes: dict[str, str],
                      reasons: frozenset[str]) -> RetryReport:
    """Retry the rows of stage ``index`` that failed for ``reasons``."""
    spec = cfg.stages[index]
    label, stage_hash = spec.label, hashes[spec.label]
    upstream = cfg.labels()[:index + 1]
    report = RetryReport(label, sorted(reasons))
    jobs = []
    for shard in range(n_shards):
        done = run.read_done(run.part(label, shard))
        inputs = [run.version_of(run.part(earlier, shard)) for earlier in upstream]
        if done is None or done.config_hash != stage_hash or done.upstream != inputs:
            continue  # not finished, failed, or blocked by an earlier stage: the normal pass owns it
        if any(done.dropped.get(reason) for reason in reasons):
            jobs.append(Job(shard, "retry_part", (stage_hash, done.version, sorted(reasons))))
        else:
            report.shards_untouched += 1
    cls = stage_class(spec.stage)
    worker = WorkerSpec(RetryRunner, {"run_root": str(run.root), "stage_path": stage_path(spec.stage),
                                      "config": spec.config.model_dump(), "label": label, "upstream": upstream},
                        cls(spec.config).resources, cls.stateful)
    retry_log = RetryLog(run.retry_log(label))
    started = time.perf_counter()
    try:
        with tqdm(total=len(jobs), desc=f"{label} (retry)", unit=" shard", leave=False) as bar:
            def on_result(result: JobResult) -> None:
                bar.update(1)
                if result.ok:
                    outcome: RetryOutcome = result.value
                    report.add(outcome)
                    if outcome.done is not None:
                        retry_log.add({"time": time.time(), "shard": outcome.shard,
                                       "rows_retried": outcome.retried, "succeeded": outcome.succeeded,
                                       "by_reason": outcome.by_reason, "still_failing": outcome.still_failing,
                                       "version_before": outcome.version_before,
                                       "version_after": outcome.done.version})
                    return
                path = run.part(label, result.job.shard)
                error = result.errors[0] if result.errors else result.error or "failed"  # the cause, not the echo
                report.shards_failed[result.job.shard] = error
                log.warning("%s retry: shard %d failed after %d attempts: %s", label, result.job.shard,
                            result.job.attempts, error)
                if run.read_done(path) is None:  # it got as far as removing the marker: redo it whole later
                    run.mark_failed(path, ShardFailed(config_hash=stage_hash, error=error,
                                                      attempts=result.job.attempts))
            executor.map(worker, jobs, on_result)
    finally:
        retry_log.close()
        report.seconds = time.perf_counter() - started
    return report
