"""The run directory: where every stage's output lives, and the markers that make resume safe.

    <run>/run.json                          resolved config, per-stage hashes, versions
    <run>/ingest/part-NNNNN.parquet         uid, url, caption and the input's extra columns
    <run>/ingest/_manifest.json             ingest's config hash and shard count
    <run>/<stage>/part-NNNNN.parquet        uid + the stage's columns + reason, one file per shard
    <run>/<stage>/NNNNN.tar                 an image stage's images, as webdataset members KEY.jpg/KEY.json
    <run>/<stage>/_markers/part-NNNNN.done.json    written last: config hash, upstream versions, stats
    <run>/<stage>/_markers/part-NNNNN.failed.json  a shard that failed after its retries, with the error
    <run>/<stage>/_markers/retries.jsonl    one line per shard `--retry-failed` redid
    <run>/<stage>/_pool/partial-NNNNN.parquet      a pool stage's per-shard summary (marker in _markers/)
    <run>/<stage>/_pool/fit.json, fit-NAME.parquet the pool stage's fit
    <run>/shards/NNNNN.tar, __len__         final training shards and their total sample count
    <run>/shards/_meta/NNNNN.parquet, sizes.json   each shard's rows, and samples per shard
    <run>/shards/_markers/NNNNN.done.json   the shard writer's markers
    <run>/takedowns.parquet, takedowns.jsonl   what ``pairsift takedown`` removed, and its audit log

Everything private sits under a name starting with ``_``: Ray Data's directory expansion skips such
paths, so ``ray.data.read_parquet(<run>/<stage>)``, DuckDB's ``read_parquet('<run>/<stage>/*.parquet')``
and ``ray.data.read_webdataset(<run>/shards)`` read exactly a stage's rows or the training samples.
This module is the one place that knows these names: nothing else builds or parses them.

Every file is written to a temporary name and renamed into place (uploaded whole, on an object
store: ``pairsift.common.storage``), and a part's marker is written after the part: a part without a matching
marker does not exist as far as resume is concerned. The root may be a local path or an fsspec URL.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

from pairsift.common.storage import AnyPath, as_path, is_remote, is_temp_name, remove, write_atomic
from pairsift.pipeline.errors import UserError

__all__ = ["RunDir", "ShardDone", "ShardFailed", "ShardsDir", "write_atomic"]

POOL, MARKERS, META = "_pool", "_markers", "_meta"
_PART = re.compile(r"part-(\d{5})\.parquet")
_WORK = re.compile(r"(?:part-|partial-)?(\d{5})")
_TAR = re.compile(r"\d{5}\.tar")
_NUMBERED = re.compile(r"\d{5}\.(tar|parquet|done\.json|failed\.json)")
_SPILL = re.compile(r"\.spread-[\w-]+\.tmp")  # ingest's domain-spreading spill folder (stages/ingest.py)


class ShardDone(BaseModel):
    """The marker of one finished piece of work (a stage's part, a partial, an output shard)."""

    config_hash: str
    upstream: list[str] = Field(default_factory=list, description="versions of the parts read")
    version: str = Field(default_factory=lambda: uuid.uuid4().hex)
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    attempts: int = 1
    errors: dict[str, int] = Field(default_factory=dict, description="capped counter of error strings")
    finished_at: float = Field(default_factory=time.time)


class ShardFailed(BaseModel):
    config_hash: str
    error: str
    attempts: int
    failed_at: float = Field(default_factory=time.time)


def shard_of(path: AnyPath) -> int:
    """The shard index in a part's, partial's, tar's or marker's name."""
    match = _WORK.fullmatch(path.name.split(".")[0])
    if match is None:
        raise ValueError(f"{path.name}: not a pairsift shard file")
    return int(match.group(1))


def is_partial(path: AnyPath) -> bool:
    return path.name.startswith("partial-")


class ShardsDir:
    """A folder of training shards, as the run writes them and as ``pairsift subset`` does: only
    ``NNNNN.tar`` and ``__len__`` at the top (what ``read_webdataset`` and open_clip read), the
    per-shard parquet, ``sizes.json`` and anything else under ``_meta/``."""

    def __init__(self, root: AnyPath):
        self.root = root

    def tar(self, index: int) -> AnyPath:
        return self.root / f"{index:05d}.tar"

    def named(self, name: str) -> AnyPath:
        return self.root / name

    def table_of(self, tar_path: AnyPath) -> AnyPath:
        return self.root / META / f"{tar_path.name.split('.')[0]}.parquet"

    def tars(self) -> list[AnyPath]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if _TAR.fullmatch(p.name))

    def tables(self) -> list[AnyPath]:
        return [self.table_of(tar) for tar in self.tars() if self.table_of(tar).exists()]

    @property
    def sizes_path(self) -> AnyPath:
        return self.root / META / "sizes.json"

    @property
    def length_path(self) -> AnyPath:
        return self.root / "__len__"

    def meta(self, name: str) -> AnyPath:
        return self.root / META / name

    def read_sizes(self) -> dict[str, int]:
        return json.loads(self.sizes_path.read_text())

    def write_sizes(self, sizes: dict[str, int]) -> None:
        """sizes.json, then ``__len__`` (open_clip's sample count when the tars' folder has no sizes.json)."""
        write_atomic(self.sizes_path, json.dumps(sizes, indent=1))
        write_atomic(self.length_path, str(sum(sizes.values())))

    def folders(self) -> list[AnyPath]:
        return [self.root, self.root / META, self.root / MARKERS]

    def remove_from(self, n_shards: int) -> None:
        """Shards numbered ``n_shards`` and up, with their parquet and marker."""
        for folder in self.folders():
            if not folder.exists():
                continue
            for path in list(folder.iterdir()):
                if _NUMBERED.fullmatch(path.name) and shard_of(path) >= n_shards:
                    remove(path)


class RunDir:
    def __init__(self, root: str | AnyPath):
        try:
            self.root = as_path(root)
        except ValueError as exc:
            raise UserError(f"run directory {exc}") from None
        self.shards = ShardsDir(self.root / "shards")

    def create(self) -> None:
        self.check_is_run()
        try:
            if not is_remote(self.root):  # an object store has no directories, and a typo must not make a bucket
                self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"run directory {self.root} is not writable: {exc.strerror or exc}") from None
        except Exception as exc:  # object stores: credentials, endpoint, missing bucket
            raise UserError(f"run directory {self.root} is not writable: {str(exc).splitlines()[0]}") from None

    def check_is_run(self) -> None:
        """A run writes (and sweeps temporaries) only in a pairsift run or a new, empty directory
        (or one holding only pairsift's own temporaries: a first run killed early)."""
        if is_remote(self.root) or not self.root.is_dir() or self.run_json.exists():
            return
        if any(p.name != ".write-probe" and not self._is_temp(p) for p in self.root.iterdir()):
            raise UserError(f"run directory {self.root} is not empty and is not a pairsift run (no run.json); "
                            "pick a new directory")

    @staticmethod
    def _is_temp(path: AnyPath) -> bool:
        return (path.is_dir() and _SPILL.fullmatch(path.name) is not None) or (path.is_file() and is_temp_name(path.name))

    def remove_temp_files(self) -> None:
        """Temporary files of pairsift writers that were killed mid-write. Only call this when no worker
        of this run can still be writing (the start and the end of a run)."""
        if is_remote(self.root):
            return  # temporaries of object-store writes live on the writer's local disk
        self.check_is_run()
        for path in self.temp_files():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def temp_files(self) -> list[AnyPath]:
        """Temporaries pairsift's writers left behind (what ``remove_temp_files`` removes)."""
        if is_remote(self.root) or not self.root.is_dir():
            return []
        return [p for p in self.root.rglob(".*.tmp") if self._is_temp(p)]

    # --- stage labels ------------------------------------------------------------------------
    def labels(self) -> list[str]:
        """Every stage's folder name, in pipeline order, from run.json."""
        return stage_labels(self.read_run_json()["config"])

    def labels_with_parts(self) -> list[str]:
        return [label for label in self.labels() if self.parts(label)]

    # --- paths -------------------------------------------------------------------------------
    def stage_dir(self, label: str) -> AnyPath:
        return self.root / label

    def part(self, label: str, shard: int) -> AnyPath:
        return self.stage_dir(label) / f"part-{shard:05d}.parquet"

    def parts(self, label: str) -> list[AnyPath]:
        """The stage's part files on disk, in shard order (finished or not: see ``is_done``)."""
        folder = self.stage_dir(label)
        if not folder.exists():
            return []
        return sorted(p for p in folder.iterdir() if _PART.fullmatch(p.name))

    def partial(self, label: str, shard: int) -> AnyPath:
        return self.stage_dir(label) / POOL / f"partial-{shard:05d}.parquet"

    def images(self, label: str, shard: int) -> AnyPath:
        return self.stage_dir(label) / f"{shard:05d}.tar"

    def image_tars(self, label: str) -> list[AnyPath]:
        return ShardsDir(self.stage_dir(label)).tars()

    def fit(self, label: str) -> AnyPath:
        return self.stage_dir(label) / POOL / "fit.json"

    def fit_table(self, label: str, name: str) -> AnyPath:
        return self.stage_dir(label) / POOL / f"fit-{name}.parquet"

    def retry_log(self, label: str) -> AnyPath:
        return self.stage_dir(label) / MARKERS / "retries.jsonl"

    @property
    def manifest(self) -> AnyPath:
        return self.stage_dir("ingest") / "_manifest.json"

    @property
    def shards_dir(self) -> AnyPath:
        return self.shards.root

    @property
    def run_json(self) -> AnyPath:
        return self.root / "run.json"

    @property
    def takedowns(self) -> AnyPath:
        """Every uid ever taken down: the catalog's and verify's input."""
        return self.root / "takedowns.parquet"

    @property
    def takedown_log(self) -> AnyPath:
        """The audit log: what was removed, when, from which shard."""
        return self.root / "takedowns.jsonl"

    # --- markers -----------------------------------------------------------------------------
    @staticmethod
    def _markers_dir(path: AnyPath) -> AnyPath:
        folder = path.parent
        return (folder.parent if folder.name == POOL else folder) / MARKERS

    @staticmethod
    def done_of(path: AnyPath) -> AnyPath:
        return RunDir._markers_dir(path) / (path.name.split(".")[0] + ".done.json")

    @staticmethod
    def failed_of(path: AnyPath) -> AnyPath:
        return RunDir._markers_dir(path) / (path.name.split(".")[0] + ".failed.json")

    def _marker_files(self, label: str, kind: str) -> list[AnyPath]:
        folder = (self.shards_dir if label == "shards" else self.stage_dir(label)) / MARKERS
        if not folder.exists():
            return []
        return sorted(p for p in folder.iterdir() if p.name.endswith(f".{kind}.json"))

    def done_markers(self, label: str, partials: bool = False) -> list[AnyPath]:
        """The done markers of a stage's parts (or its partials), or with ``"shards"`` of the output shards."""
        return [m for m in self._marker_files(label, "done") if is_partial(m) == partials]

    def failures(self, label: str) -> list[tuple[AnyPath, ShardFailed]]:
        """(marker, what failed) for every shard of the stage that failed after its retries;
        ``is_partial(marker)`` tells a pool stage's summary step from its apply step."""
        found = []
        for marker in self._marker_files(label, "failed"):
            try:
                found.append((marker, ShardFailed.model_validate_json(marker.read_text())))
            except (OSError, ValueError):
                continue
        return found

    def read_done(self, path: AnyPath) -> ShardDone | None:
        try:
            return ShardDone.model_validate_json(self.done_of(path).read_text())
        except (OSError, ValueError):
            return None

    def is_done(self, path: AnyPath, config_hash: str, upstream: list[str] | None = None) -> bool:
        done = self.read_done(path)
        if done is None or done.config_hash != config_hash or not path.exists():
            return False
        return upstream is None or done.upstream == upstream

    def mark_done(self, path: AnyPath, done: ShardDone) -> None:
        remove(self.failed_of(path))
        write_atomic(self.done_of(path), done.model_dump_json())

    def mark_failed(self, path: AnyPath, failed: ShardFailed) -> None:
        write_atomic(self.failed_of(path), failed.model_dump_json())

    def read_failed(self, path: AnyPath) -> ShardFailed | None:
        try:
            return ShardFailed.model_validate_json(self.failed_of(path).read_text())
        except (OSError, ValueError):
            return None

    def version_of(self, path: AnyPath) -> str | None:
        done = self.read_done(path)
        return done.version if done else None

    # --- run.json ----------------------------------------------------------------------------
    def read_run_json(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text())
        except OSError:
            raise UserError(f"{self.root} is not a pairsift run directory (no run.json)") from None

    def write_run_json(self, data: dict[str, Any]) -> None:
        write_atomic(self.run_json, json.dumps(data, indent=2, default=str))

    def n_shards(self) -> int:
        """How many input shards ingest cut (from its manifest; 0 before ingest finished)."""
        try:
            return int(json.loads(self.manifest.read_text())["n_shards"])
        except (OSError, ValueError, KeyError):
            return len(self.parts("ingest"))


def stage_labels(config: dict[str, Any]) -> list[str]:
    """``ingest`` and every configured stage's label, in order, from a resolved config (run.json's)."""
    labels = ["ingest"] + [s["label"] for s in config.get("stages", [])]
    for label in labels:
        check_label(label)
    return labels


_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_label(label: str) -> None:
    """A label names a folder and a catalog view: no path separators, no quotes, no leading dot."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise UserError(f"stage label {label!r}: use letters, digits, '_', '.', '-' (not first), "
                        "e.g. 'clip_filter-2'")
