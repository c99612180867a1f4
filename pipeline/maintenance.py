"""Maintaining finished runs without re-download: subsets of the shards, and takedowns in place.

``subset`` copies the samples a uid/url list selects (or every other one, with ``exclude``) from a
run's final shards into new shards elsewhere. ``takedown`` removes the samples whose url is listed
from a run in place: training shards, their parquet, sizes.json and __len__, and the stored images in every
stage's image tar (download/NNNNN.tar), and records them so the catalog and verify know.

Both stream each tar member by member (images are copied as bytes, never decoded) and hold one
shard's parquet plus the id list in memory: a billion-sample run costs what its largest shard costs.

A takedown is crash-safe and finishes by being run again (with the same or any other list):
1. plan: every matching uid (from the ingest parts, so rows dropped earlier count too) is added to
   ``<run>/takedowns.parquet`` before anything is removed; from then on the catalog and verify treat
   them as gone, and every later takedown finishes removing them;
2. per final shard holding one: tar and parquet are written to temporary names, then renamed into
   place, then its ``.done.json`` gets the new ``kept``; image tars are rewritten the same way;
3. ``shards/_meta/sizes.json`` and ``shards/__len__`` are rewritten from the shards' row counts;
4. ``<run>/takedowns.jsonl`` gets one line per removed sample not logged before (time, url, uid, shard).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pairsift.common.storage import (
    AnyPath,
    as_path,
    is_remote,
    is_temp_name,
    new_temp_file,
    open_parquet,
    publish,
    read_parquet,
    remove,
)
from pairsift.common.tars import members_of, split_name, tar_writer
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.id_lists import read_id_list
from pairsift.pipeline.run_dir import RunDir, ShardDone, ShardsDir, shard_of, write_atomic

TAKEDOWN_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("shard", pa.string()),
                             ("input_shard", pa.int32()), ("requested_at", pa.float64())])
_SUBSET_FILES = re.compile(r"(\d{5}\.tar|__len__|_meta|_markers|\..+\.tmp)")  # a ShardsDir's names
# What a takedown writes, so a killed one's temporaries (and only those) are removed by the next.
_TAKEDOWN_WRITES = re.compile(r"\.(\d{5}\.(tar|parquet|done\.json)|sizes\.json|__len__|takedowns\.parquet)")


# --- files -----------------------------------------------------------------------------------

@contextmanager
def _temporaries(*paths: AnyPath) -> Iterator[list[Path]]:
    """Local temporary files for ``paths``; whatever the block leaves unpublished is removed."""
    temps = [new_temp_file(p) for p in paths]
    try:
        yield temps
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _commit(temps: list[Path], finals: list[AnyPath]) -> None:
    """Move finished temporaries into place (each move is atomic: a rename, or one whole upload)."""
    for tmp, final in zip(temps, finals):
        publish(tmp, final)


def copy_tar_members(src: AnyPath, dst: Path, keep: Callable[[str], bool]) -> list[str]:
    """Stream the members of ``src`` whose key ``keep`` accepts into a new tar at ``dst``, header and
    bytes unchanged (nothing is decoded). Returns the kept keys in order."""
    kept: list[str] = []
    with tar_writer(dst) as out:
        for member in members_of(src):
            key = split_name(member.name)[0]
            if not keep(key):
                continue
            out.copy(member)
            if not kept or kept[-1] != key:
                kept.append(key)
    return kept


def tar_keys(path: AnyPath) -> set[str]:
    """The sample keys in a tar, from its headers only (seeks over the data)."""
    return {split_name(member.name)[0] for member in members_of(path)}


def _shard_names(shards: ShardsDir) -> list[str]:
    sizes_path = shards.sizes_path
    try:
        sizes = shards.read_sizes()
    except (OSError, ValueError):
        raise UserError(f"{sizes_path}: missing or unreadable; is the run finished? (`pairsift run` writes it last)") from None
    return sorted(sizes)


def _read_shard_table(shards: ShardsDir, name: str, columns: list[str] | None = None,
                      need: tuple[str, ...] = ("uid",)) -> pa.Table:
    """A shard's parquet (only ``columns`` if given), which must have the ``need`` columns."""
    table_path = shards.table_of(shards.named(name))
    if not table_path.exists():
        raise UserError(f"{table_path}: missing; every shard's parquet must be in _meta/ beside its tar (`pairsift verify`)")
    with open_parquet(table_path) as reader:
        names = reader.schema_arrow.names
    for name in set(need) | set(columns or ()):
        if name not in names:
            raise UserError(f"{table_path}: has no '{name}' column, so samples cannot be selected by it")
    return read_parquet(table_path, columns=columns)


def _id_array(ids: set[str]) -> pa.Array:
    """Built once per list: a million-id list is not rebuilt for every shard."""
    return pa.array(list(ids), pa.string())


def _in(table: pa.Table, column: str, ids: set[str] | pa.Array) -> pa.ChunkedArray:
    value_set = _id_array(ids) if isinstance(ids, set) else ids
    return pc.fill_null(pc.is_in(table.column(column), value_set=value_set), False)


# --- subset ----------------------------------------------------------------------------------

@dataclass
class SubsetSummary:
    out: str
    listed: int
    not_found: int
    shards_in: int
    shards_out: int
    samples_in: int
    samples_out: int

    def line(self) -> str:
        return (f"wrote {self.samples_out:,} of {self.samples_in:,} samples in {self.shards_out} shards to {self.out} "
                f"({self.listed:,} ids listed, {self.not_found:,} not in the run)")


def _source_shards(run_dir: AnyPath) -> ShardsDir:
    """A run directory, or a shards directory itself (so a subset can be subset again)."""
    run_dir = _location(run_dir)
    shards = ShardsDir(run_dir)
    return shards if shards.sizes_path.exists() else RunDir(run_dir).shards


def _resolved(path: AnyPath) -> str:
    return str(path) if is_remote(path) else str(path.resolve())


def _location(location: str | AnyPath) -> AnyPath:
    try:
        return as_path(location)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _prepare_out(out: ShardsDir, source: ShardsDir) -> None:
    if _resolved(out.root) in (_resolved(source.root), _resolved(source.root.parent)):
        raise UserError(f"--out {out}: must not be the run or its shards directory; pick a new directory")
    if out.root.exists():
        foreign = [p.name for p in out.root.iterdir() if not _SUBSET_FILES.fullmatch(p.name)]
        if foreign:
            raise UserError(f"--out {out.root}: not empty and not an earlier subset ({foreign[0]} ...); pick a new directory")
        remove(out.meta("subset.json"))  # incomplete until written again, last
        for folder in out.folders():
            for stale in folder.glob(".*.tmp") if folder.exists() else []:
                if is_temp_name(stale.name):
                    remove(stale)
    out.root.mkdir(parents=True, exist_ok=True)


def subset(run_dir: str | AnyPath, uids: Path | None, urls: Path | None, exclude: bool,
           out: str | AnyPath) -> SubsetSummary:
    """Write new shards into ``out`` holding the listed samples (all but them with ``exclude``).

    One output shard per input shard that keeps a sample, numbered from 00000, each with its parquet,
    then sizes.json and subset.json (written last: the subset is complete when it exists)."""
    if (uids is None) == (urls is None):
        raise UserError("give exactly one of --uids FILE or --urls FILE")
    column = "uid" if uids is not None else "url"
    list_path = Path(uids if uids is not None else urls)  # type: ignore[arg-type]
    ids = read_id_list(list_path, column)
    source, out = _source_shards(run_dir), ShardsDir(_location(out))
    names = _shard_names(source)
    _prepare_out(out, source)
    found: set[str] = set()
    sizes: dict[str, int] = {}
    samples_in = 0
    value_set = _id_array(ids)
    for name in names:
        table = _read_shard_table(source, name, need=("uid", column))
        samples_in += table.num_rows
        hit = _in(table, column, value_set)
        found.update(table.filter(hit).column(column).to_pylist())
        chosen = table.filter(pc.invert(hit) if exclude else hit)
        if chosen.num_rows == 0:
            continue
        target = out.tar(len(sizes))
        _copy_shard(source.named(name), target, out.table_of(target), chosen)
        sizes[target.name] = chosen.num_rows
    out.remove_from(len(sizes))  # an earlier, larger subset into the same directory
    out.write_sizes(sizes)
    summary = SubsetSummary(str(out.root), len(ids), len(ids - found), len(names), len(sizes), samples_in,
                            sum(sizes.values()))
    write_atomic(out.meta("subset.json"), json.dumps({
        "source": _resolved(source.root), "list": str(list_path.resolve()), "by": column, "exclude": exclude,
        "created_at": time.time(), **{k: v for k, v in summary.__dict__.items() if k != "out"}}, indent=1))
    return summary


def _copy_shard(src_tar: AnyPath, dst_tar: AnyPath, dst_parquet: AnyPath, chosen: pa.Table) -> None:
    keep = set(chosen.column("uid").to_pylist())
    with _temporaries(dst_tar, dst_parquet) as (tmp_tar, tmp_parquet):
        copied = copy_tar_members(src_tar, tmp_tar, keep.__contains__)
        if copied != chosen.column("uid").to_pylist():
            raise UserError(f"{src_tar}: tar members and parquet rows disagree; run `pairsift verify` on the run")
        pq.write_table(chosen, tmp_parquet)
        _commit([tmp_tar, tmp_parquet], [dst_tar, dst_parquet])


# --- takedown --------------------------------------------------------------------------------

@dataclass
class TakedownSummary:
    urls_listed: int
    urls_not_found: int
    uids_added: int
    samples_removed: int
    shards_rewritten: int
    image_tars_rewritten: int
    logged: int

    def line(self) -> str:
        return (f"took down {self.uids_added:,} samples ({self.urls_not_found:,} of {self.urls_listed:,} urls not in "
                f"the run); removed {self.samples_removed:,} from {self.shards_rewritten} shards and "
                f"{self.image_tars_rewritten} image tars; logged {self.logged:,}")


def taken_down_uids(run_root: str | AnyPath) -> set[str]:
    """Every uid a takedown removed from the run (empty when none): rows the catalog marks 'takedown'."""
    path = RunDir(run_root).takedowns
    if not path.exists():
        return set()
    return set(read_parquet(path, columns=["uid"]).column("uid").to_pylist())


@contextmanager
def _run_lock(run: RunDir) -> Iterator[None]:
    """One takedown at a time per run; the OS drops the lock if the process dies. Object stores
    have no such lock: there, running one takedown at a time is the operator's job (README)."""
    if is_remote(run.root):
        yield
        return
    with open(run.root / ".takedown.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run.root}: another takedown is running on this run; wait for it") from None
        yield


def takedown(run_dir: str | AnyPath, urls: Path) -> TakedownSummary:
    """Remove every sample whose url is listed from the run in place; see the module note."""
    run = RunDir(run_dir)
    meta = run.read_run_json()
    if meta.get("status") == "running":
        raise UserError(f"{run.root}: the run is not finished (status 'running'); rerun `pairsift run` to finish it first")
    listed = read_id_list(Path(urls), "url")
    labels = run.labels()
    names = _shard_names(run.shards)
    with _run_lock(run):
        _remove_stale_temporaries(run, labels)
        plan, added, found_urls = _plan(run, names, listed)
        removed, rewritten = 0, 0
        by_shard = {name: uids for name, uids in _group(plan, "shard").items() if name in names}
        for name, uids in by_shard.items():
            count = take_down_shard(run, name, uids)
            removed += count
            rewritten += count > 0
        image_tars = sum(_scrub_images(run, labels, int(s), uids) for s, uids in _group(plan, "input_shard").items())
        _update_sizes(run, list(by_shard))
        logged = _log(run, plan)
    return TakedownSummary(len(listed), len(listed - found_urls), added, removed, rewritten, image_tars, logged)


def _remove_stale_temporaries(run: RunDir, labels: list[str]) -> None:
    """A takedown killed hard leaves its temporaries; nothing else writes to a finished run."""
    for folder in run.shards.folders() + [run.root] + [run.stage_dir(label) for label in labels]:
        for tmp in folder.glob(".*.tmp") if folder.exists() else []:
            if is_temp_name(tmp.name) and _TAKEDOWN_WRITES.fullmatch(tmp.name.split(".pairsift-")[0]):
                tmp.unlink(missing_ok=True)


def _plan(run: RunDir, names: list[str], urls: set[str]) -> tuple[pa.Table, int, set[str]]:
    """Add every uid with a listed url to takedowns.parquet before removing anything; return the
    whole table (earlier takedowns included, so an interrupted one is finished too)."""
    path = run.takedowns
    known = read_parquet(path).cast(TAKEDOWN_SCHEMA) if path.exists() else TAKEDOWN_SCHEMA.empty_table()
    seen = set(known.column("uid").to_pylist())
    new: dict[str, dict] = {}
    found_urls: set[str] = set()
    now = time.time()
    listed = _id_array(urls)
    for part in run.parts("ingest"):
        table = read_parquet(part, columns=["uid", "url"])
        for row in table.filter(_in(table, "url", listed)).to_pylist():
            found_urls.add(row["url"])
            if row["uid"] not in seen:
                new[row["uid"]] = {**row, "shard": None, "input_shard": shard_of(part), "requested_at": now}
    for name in names:  # where each sample sits in the training shards, if it got there
        table = _read_shard_table(run.shards, name, ["uid", "url"])
        for row in table.filter(_in(table, "url", listed)).to_pylist():
            found_urls.add(row["url"])
            if row["uid"] not in seen:
                entry = new.setdefault(row["uid"], {**row, "input_shard": None, "requested_at": now})
                entry["shard"] = name
    if new:
        known = pa.concat_tables([known, pa.Table.from_pylist(list(new.values()), TAKEDOWN_SCHEMA)])
        write_atomic(path, known)
    return known, len(new), found_urls


def _group(plan: pa.Table, column: str) -> dict:
    groups: dict = {}
    for key, uid in zip(plan.column(column).to_pylist(), plan.column("uid").to_pylist()):
        if key is not None:
            groups.setdefault(key, set()).add(uid)
    return dict(sorted(groups.items()))


def take_down_shard(run: RunDir, name: str, uids: set[str]) -> int:
    """Rewrite one training shard without ``uids`` (tar and parquet both to temporaries, then both
    renamed), then its marker. Returns how many samples it removed (0 if already done)."""
    tar_path = run.shards.named(name)
    table_path = run.shards.table_of(tar_path)
    table = _read_shard_table(run.shards, name, ["uid"])  # most shards of an old plan are done: read the ids only
    count = pc.sum(_in(table, "uid", uids)).as_py() or 0
    if count:
        table = _read_shard_table(run.shards, name)
        remaining = table.filter(pc.invert(_in(table, "uid", uids)))
        with _temporaries(tar_path, table_path) as (tmp_tar, tmp_table):
            copy_tar_members(tar_path, tmp_tar, lambda key: key not in uids)
            pq.write_table(remaining, tmp_table)
            _commit([tmp_tar, tmp_table], [tar_path, table_path])
        table = remaining
    _update_marker(run, tar_path, table.num_rows)
    return count


def _update_marker(run: RunDir, tar_path: AnyPath, rows: int) -> None:
    """The shard's kept count is what the runner's sizes.json reads on a later rerun."""
    done = run.read_done(tar_path)
    if done is None or done.kept == rows:
        return
    dropped = dict(done.dropped)
    dropped["takedown"] = dropped.get("takedown", 0) + done.kept - rows
    fixed = ShardDone(**(done.model_dump() | {"kept": rows, "dropped": dropped, "version": uuid.uuid4().hex}))
    write_atomic(run.done_of(tar_path), fixed.model_dump_json())


def _scrub_images(run: RunDir, labels: list[str], input_shard: int, uids: set[str]) -> int:
    """Remove the stored images of ``uids`` from every stage's image tar of that input shard."""
    rewritten = 0
    for label in labels:
        tar_path = run.images(label, input_shard)
        if not tar_path.exists() or not tar_keys(tar_path) & uids:
            continue
        with _temporaries(tar_path) as (tmp,):
            copy_tar_members(tar_path, tmp, lambda key: key not in uids)
            _commit([tmp], [tar_path])
        rewritten += 1
    return rewritten


def _update_sizes(run: RunDir, touched: list[str]) -> None:
    """Set the touched shards' counts from their parquet (its footer: no rows are read)."""
    sizes = run.shards.read_sizes()
    fresh = dict(sizes)
    for name in touched:
        with open_parquet(run.shards.table_of(run.shards.named(name))) as reader:
            fresh[name] = reader.metadata.num_rows
    if fresh != sizes:
        run.shards.write_sizes(fresh)


def _logged_uids(path: AnyPath) -> set[str]:
    """uids already in the log; a last line cut off by a crash is dropped so appends stay valid."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # only local appends can be cut off: an upload is whole
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as handle:
            handle.truncate(len(data))
    return {json.loads(line)["uid"] for line in data.splitlines() if line.strip()}


def _log(run: RunDir, plan: pa.Table) -> int:
    path = run.takedown_log
    logged = _logged_uids(path)
    now = time.time()
    lines = [json.dumps({"time": now, "url": row["url"], "uid": row["uid"], "shard": row["shard"]}) + "\n"
             for row in plan.select(["uid", "url", "shard"]).to_pylist() if row["uid"] not in logged]
    if lines and is_remote(path):  # object stores cannot append: write the log again, whole
        write_atomic(path, (path.read_bytes() if path.exists() else b"") + "".join(lines).encode())
    elif lines:
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
    return len(lines)
