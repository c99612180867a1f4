"""The run directory: where every stage's output lives, and the markers that make resume safe.

    <run>/run.json                         resolved config, per-stage hashes, versions
    <run>/ingest/part-NNNNN.parquet        uid, url, caption and the input's extra columns
    <run>/<stage>/part-NNNNN.parquet       uid + the stage's columns + reason, one file per shard
    <run>/<stage>/part-NNNNN.done.json     written last: config hash, upstream versions, stats
    <run>/<stage>/part-NNNNN.failed.json   a shard that failed after its retries, with the error
    <run>/<stage>/partial-NNNNN.parquet    a pool stage's per-shard summary; <stage>/fit.json its fit
    <run>/download/NNNNN.tar               images, as webdataset members KEY.jpg/KEY.json
    <run>/shards/NNNNN.tar|.parquet        final training shards, plus sizes.json

Every file is written to a temporary name and renamed into place (uploaded whole, on an object
store: ``pairsift.common.storage``), and a part's marker is written after the part: a part without a matching
marker does not exist as far as resume is concerned. The root may be a local path or an fsspec URL.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

from pairsift.common.storage import AnyPath, as_path, is_remote, remove, write_atomic
from pairsift.pipeline.errors import UserError

__all__ = ["RunDir", "ShardDone", "ShardFailed", "write_atomic"]


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


class RunDir:
    def __init__(self, root: str | AnyPath):
        try:
            self.root = as_path(root)
        except ValueError as exc:
            raise UserError(f"run directory {exc}") from None

    def create(self) -> None:
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

    def remove_temp_files(self) -> None:
        """Temporary files of writers that were killed mid-write. Only call this when no worker of
        this run can still be writing (the start and the end of a run)."""
        if is_remote(self.root):
            return  # temporaries of object-store writes live on the writer's local disk
        for path in list(self.root.rglob(".*.tmp")):
            if path.is_dir():  # ingest's domain-spreading spill
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # --- paths -------------------------------------------------------------------------------
    def stage_dir(self, label: str) -> AnyPath:
        return self.root / label

    def part(self, label: str, shard: int) -> AnyPath:
        return self.stage_dir(label) / f"part-{shard:05d}.parquet"

    def partial(self, label: str, shard: int) -> AnyPath:
        return self.stage_dir(label) / f"partial-{shard:05d}.parquet"

    def images(self, label: str, shard: int) -> AnyPath:
        return self.stage_dir(label) / f"{shard:05d}.tar"

    def fit(self, label: str) -> AnyPath:
        return self.stage_dir(label) / "fit.json"

    @staticmethod
    def done_of(path: AnyPath) -> AnyPath:
        return path.with_name(path.name.split(".")[0] + ".done.json")

    @staticmethod
    def failed_of(path: AnyPath) -> AnyPath:
        return path.with_name(path.name.split(".")[0] + ".failed.json")

    @property
    def shards_dir(self) -> AnyPath:
        return self.root / "shards"

    @property
    def run_json(self) -> AnyPath:
        return self.root / "run.json"

    # --- markers -----------------------------------------------------------------------------
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
