"""Run one stage on one shard: assemble its input from the run directory, call it, write atomically.

This is the single piece of code both executors (in-process and Ray) call, so a stage behaves the
same wherever it runs. The input of a stage is the ingest part joined with every earlier stage's
columns, keeping only rows no earlier stage dropped; rows keep their order, so joins are positional
and checked by uid.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pairsift.common.images import IMAGE_MEMBER_EXTENSIONS
from pairsift.common.images import extension_of as image_extension
from pairsift.common.storage import AnyPath, read_parquet, read_parquet_subset
from pairsift.common.tars import members_of, split_name, write_tar
from pairsift.pipeline.run_dir import RunDir, ShardDone, write_atomic
from pairsift.stages import import_stage
from pairsift.stages.base import IMAGE, REASON, Contract, PoolStage, Stage, StageConfig

MAX_ERROR_KINDS = 20  # a capped counter: a million distinct errors must not become a million keys


def samples(table: pa.Table, sample_json: dict[str, str]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """``(uid, members)`` of every row with an image, in row order: KEY.<ext>, KEY.txt (the
    caption, webdataset's convention) and KEY.json (``sample_json``: json key -> column), KEY = uid."""
    present = set(table.column_names)
    values = {key: table.column(col).to_pylist() if col in present else None for key, col in sample_json.items()}
    captions = table.column("caption").to_pylist() if "caption" in present else [None] * table.num_rows
    for row, (uid, image) in enumerate(zip(table.column("uid").to_pylist(), table.column(IMAGE).to_pylist())):
        if image is None:
            continue
        meta = {key: column[row] if column is not None else None for key, column in values.items()}
        yield uid, [(f"{uid}.{image_extension(image)}", image),
                    (f"{uid}.txt", (captions[row] or "").encode("utf-8", "replace")),
                    (f"{uid}.json", json.dumps(meta).encode())]


def write_image_tar(path: AnyPath, table: pa.Table, sample_json: dict[str, str]) -> int:
    """The rows with an image as a webdataset tar, in the layout img2dataset writes (see ``samples``)."""
    count = 0
    with write_tar(path) as tar:
        for _, members in samples(table, sample_json):
            tar.add_sample(members)
            count += 1
    return count


def tar_stats_path(run: RunDir, label: str, shard: int) -> AnyPath:
    """img2dataset's per-shard stats file beside the tar: ``NNNNN_stats.json``."""
    tar = run.images(label, shard)
    return tar.with_name(f"{tar.name.split('.')[0]}_stats.json")


def read_image_tar(path: AnyPath) -> dict[str, bytes]:
    """uid -> image bytes of every sample in a stage's image tar (local or object storage, streamed)."""
    images: dict[str, bytes] = {}
    for member in members_of(path):
        key, ext = split_name(member.name)
        if ext in IMAGE_MEMBER_EXTENSIONS and member.is_file():
            images[key] = member.read()
    return images


def alive(table: pa.Table) -> pa.Table:
    if REASON not in table.column_names:
        return table
    return table.filter(pc.is_null(table.column(REASON))).drop_columns([REASON])


def join_positional(base: pa.Table, part: pa.Table, where: str) -> pa.Table:
    """Add ``part``'s columns to ``base`` (same rows, same order), then keep the rows it kept."""
    if base.num_rows != part.num_rows or base.column("uid") != part.column("uid"):
        raise RuntimeError(f"{where}: rows do not line up with the stage's input; rerun this stage")
    for name in part.column_names:
        if name == "uid":
            continue
        column = part.column(name)
        if name in base.column_names:
            base = base.set_column(base.column_names.index(name), name, column)
        else:
            base = base.append_column(name, column)
    return alive(base)


def load_input(run: RunDir, upstream: list[str], shard: int, columns: set[str] | None = None) -> pa.Table:
    """The rows still alive before the next stage, with every earlier stage's columns, or only
    ``columns`` of them (plus uid and each part's reason, which decide what is alive)."""

    def read(label: str) -> pa.Table:
        path = run.part(label, shard)
        return read_parquet(path) if columns is None else read_parquet_subset(path, columns | {"uid", REASON})

    table = read("ingest")
    for label in upstream[1:]:
        table = join_positional(table, read(label), f"{label} shard {shard}")
    return table


def attach_images(run: RunDir, upstream: list[str], shard: int, table: pa.Table) -> pa.Table:
    """Add the ``image`` column from the latest earlier stage that stored images (download, or ingest of tars)."""
    images: dict[str, bytes] = {}
    for label in reversed(upstream):
        tar_path = run.images(label, shard)
        if tar_path.exists():
            images = read_image_tar(tar_path)
            break
    column = pa.array([images.get(uid) for uid in table.column("uid").to_pylist()], pa.binary())
    if IMAGE in table.column_names:
        return table.set_column(table.column_names.index(IMAGE), IMAGE, column)
    return table.append_column(IMAGE, column)


def summarise(output: pa.Table, seconds: float) -> dict[str, Any]:
    reasons = Counter(r for r in output.column(REASON).to_pylist() if r is not None)
    errors: Counter[str] = Counter()
    if "error" in output.column_names:
        errors.update(e.splitlines()[0][:200] for e in output.column("error").to_pylist() if e)
    return {
        "rows_in": output.num_rows,
        "kept": output.num_rows - sum(reasons.values()),
        "dropped": dict(reasons),
        "seconds": seconds,
        "errors": dict(errors.most_common(MAX_ERROR_KINDS)),
    }


def check_output(stage: Stage, contract: Contract, given: pa.Table, output: pa.Table) -> pa.Table:
    """The stage kept its rows and wrote what its contract declares, with the declared types."""
    if not isinstance(output, pa.Table) or output.num_rows != given.num_rows:
        raise RuntimeError(f"stage {stage.name} returned a different number of rows than it was given")
    if output.column("uid") != given.column("uid"):
        raise RuntimeError(f"stage {stage.name} reordered or changed the rows it was given")
    undeclared = [n for n in output.column_names if n not in given.column_names and n not in contract.writes
                  and n != REASON]
    if undeclared:
        raise RuntimeError(f"stage {stage.name} wrote columns its contract does not declare: {', '.join(undeclared)}")
    for name, kind in contract.writes.items():
        if name not in output.column_names or output.schema.field(name).type == kind:
            continue
        try:  # an empty shard's column is typed null; int32 where int64 was declared is fine
            column = output.column(name).cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise RuntimeError(f"stage {stage.name} wrote {name} as {output.schema.field(name).type}; "
                               f"its contract declares {kind}") from None
        output = output.set_column(output.column_names.index(name), name, column)
    if REASON not in output.column_names:
        output = output.append_column(REASON, pa.nulls(output.num_rows, pa.string()))
    return output


def write_part(run: RunDir, label: str, shard: int, output: pa.Table, stage: Stage, contract: Contract,
               started_at: float) -> None:
    """The columns the stage's contract writes go to its parquet part; an image column goes to a tar
    beside it, with the stage's per-shard stats file (if it has one) next to the tar."""
    if IMAGE in contract.writes:
        write_image_tar(run.images(label, shard), output, stage.sample_json)
        stats = stage.tar_stats(output, started_at, time.time())
        if stats is not None:
            write_atomic(tar_stats_path(run, label, shard), json.dumps(stats, indent=4))
    keep = ["uid"] + [n for n in contract.writes if n in output.column_names and n not in ("uid", IMAGE)]
    write_atomic(run.part(label, shard), output.select([*keep, REASON]))


class ShardRunner:
    """One stage, set up once, applied to shards. Executors create one per worker."""

    def __init__(self, run_root: str, stage_path: str, config: dict[str, Any], label: str,
                 upstream: list[str]):
        self.run = RunDir(run_root)
        self.label = label
        self.upstream = upstream
        cls = import_stage(stage_path)  # resolved on the driver: workers need no registry
        cfg: StageConfig = cls.config_class(**config)
        self.stage = cls(cfg)
        self.contract = self.stage.contract()
        self.stage.setup()

    def _input(self, shard: int) -> pa.Table:
        """Only the columns the stage's contract reads, with the images when it reads them."""
        uses = set(self.contract.reads) | set(self.contract.optional)
        table = load_input(self.run, self.upstream, shard, uses - {IMAGE})
        if IMAGE in uses:
            table = attach_images(self.run, self.upstream, shard, table)
        return table

    def run_part(self, shard: int, config_hash: str, upstream_versions: list[str]) -> ShardDone:
        started, started_at = time.perf_counter(), time.time()
        given = self._input(shard)
        output = check_output(self.stage, self.contract, given, self.stage(given))
        write_part(self.run, self.label, shard, output, self.stage, self.contract, started_at)
        done = ShardDone(config_hash=config_hash, upstream=upstream_versions,
                         **summarise(output, time.perf_counter() - started))
        self.run.mark_done(self.run.part(self.label, shard), done)
        return done

    def run_partial(self, shard: int, config_hash: str, upstream_versions: list[str]) -> ShardDone:
        assert isinstance(self.stage, PoolStage)
        started = time.perf_counter()
        given = self._input(shard)
        summary = self.stage.partial(given)
        path = self.run.partial(self.label, shard)
        write_atomic(path, summary)
        done = ShardDone(config_hash=config_hash, upstream=upstream_versions, rows_in=given.num_rows,
                         kept=given.num_rows, seconds=time.perf_counter() - started)
        self.run.mark_done(path, done)
        return done

    def run_apply(self, shard: int, config_hash: str, upstream_versions: list[str],
                  fitted: dict[str, Any]) -> ShardDone:
        assert isinstance(self.stage, PoolStage)
        started, started_at = time.perf_counter(), time.time()
        given = self._input(shard)
        summary = read_parquet(self.run.partial(self.label, shard))
        output = check_output(self.stage, self.contract, given, self.stage.apply(given, fitted, summary))
        write_part(self.run, self.label, shard, output, self.stage, self.contract, started_at)
        done = ShardDone(config_hash=config_hash, upstream=upstream_versions,
                         **summarise(output, time.perf_counter() - started))
        self.run.mark_done(self.run.part(self.label, shard), done)
        return done
