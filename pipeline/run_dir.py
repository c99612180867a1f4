"""The run directory: where every stage's output lives, and the markers that make resume safe.

    <run>/run.json                         resolved config, per-stage hashes, versions
    <run>/ingest/part-NNNNN.parquet        uid, url, caption and the input's extra columns
    <run>/<stage>/part-NNNNN.parquet       uid + the stage's columns + reason, one file per shard
    <run>/<stage>/part-NNNNN.done.json     written last: config hash, upstream versions, stats
    <run>/<stage>/part-NNNNN.failed.json   a shard that failed after its retries, with the error
    <run>/<stage>/partial-NNNNN.parquet    a pool stage's per-shard summary; <stage>/fit.json its fit
    <run>/download/NNNNN.tar               images, as webdataset members KEY.jpg/KEY.json
    <run>/shards/NNNNN.tar|.parquet        final training shards, plus sizes.json

Every file is written to a temporary name and renamed into place, and a part's marker is written
after the part: a part without a matching marker does not exist as far as resume is concerned.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from pipeline.errors import UserError


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


def write_atomic(path: Path, data: bytes | str | pa.Table) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if isinstance(data, pa.Table):
            os.close(fd)
            pq.write_table(data, tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"run directory {self.root} is not writable: {exc.strerror or exc}") from None

    def remove_temp_files(self) -> None:
        """Temporary files of writers that were killed mid-write. Only call this when no worker of
        this run can still be writing (the start and the end of a run)."""
        for path in self.root.rglob(".*.tmp"):
            path.unlink(missing_ok=True)

    # --- paths -------------------------------------------------------------------------------
    def stage_dir(self, label: str) -> Path:
        return self.root / label

    def part(self, label: str, shard: int) -> Path:
        return self.stage_dir(label) / f"part-{shard:05d}.parquet"

    def partial(self, label: str, shard: int) -> Path:
        return self.stage_dir(label) / f"partial-{shard:05d}.parquet"

    def images(self, label: str, shard: int) -> Path:
        return self.stage_dir(label) / f"{shard:05d}.tar"

    def fit(self, label: str) -> Path:
        return self.stage_dir(label) / "fit.json"

    @staticmethod
    def done_of(path: Path) -> Path:
        return path.with_name(path.name.split(".")[0] + ".done.json")

    @staticmethod
    def failed_of(path: Path) -> Path:
        return path.with_name(path.name.split(".")[0] + ".failed.json")

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    # --- markers -----------------------------------------------------------------------------
    def read_done(self, path: Path) -> ShardDone | None:
        try:
            return ShardDone.model_validate_json(self.done_of(path).read_text())
        except (OSError, ValueError):
            return None

    def is_done(self, path: Path, config_hash: str, upstream: list[str] | None = None) -> bool:
        done = self.read_done(path)
        if done is None or done.config_hash != config_hash or not path.exists():
            return False
        return upstream is None or done.upstream == upstream

    def mark_done(self, path: Path, done: ShardDone) -> None:
        self.failed_of(path).unlink(missing_ok=True)
        write_atomic(self.done_of(path), done.model_dump_json())

    def mark_failed(self, path: Path, failed: ShardFailed) -> None:
        write_atomic(self.failed_of(path), failed.model_dump_json())

    def read_failed(self, path: Path) -> ShardFailed | None:
        try:
            return ShardFailed.model_validate_json(self.failed_of(path).read_text())
        except (OSError, ValueError):
            return None

    def version_of(self, path: Path) -> str | None:
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
