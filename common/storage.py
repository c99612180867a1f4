"""Files on local disk or on any fsspec filesystem (s3://, gs://, ...), behind one path type.

A location that is a URL with a scheme other than ``file`` becomes a ``UPath`` (pathlib's API over
fsspec); anything else stays a plain ``pathlib.Path``, so local runs behave exactly as they always
have. Credentials and endpoints come from the filesystem's usual sources (for s3: the AWS_*
environment variables and config files), which is also how Ray workers pick them up.

Atomic writes differ by kind of storage, and this is the one place that knows:
- local: write a temporary file beside the target and ``os.replace`` it into place;
- object stores: write a local temporary file and upload it in one PUT (or a multipart upload that
  completes at the end): an object is visible whole or not at all, so no reader ever sees half a tar.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

AnyPath = Any  # pathlib.Path or upath.UPath: the pathlib methods both have are all this module relies on


def is_url(location: str) -> bool:
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def as_path(location: str | os.PathLike | AnyPath) -> AnyPath:
    """A path object for a local path, a ``file://`` URL or a remote fsspec URL."""
    if isinstance(location, (Path, UPath)):
        return location
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if not is_url(text):
        return Path(text)
    try:
        # Several processes write one run: a cached directory listing would hide their parts.
        return UPath(text, use_listings_cache=False)
    except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs: pip install 'pairsift[storage]'
        raise ValueError(f"{text}: {str(exc).splitlines()[0]}") from None


# Object-store settings that are safe to hand to Ray (it stores them in its tables): where to
# connect and where credentials live, never the credentials themselves (keys, tokens, connection
# strings, FSSPEC_* options). Local workers inherit the rest from the driver; cluster nodes get
# their credentials from their own role or workload identity.
_NON_SECRET_STORAGE_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                           "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED",
                           "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "AZURE_STORAGE_ACCOUNT_NAME")


def storage_env() -> dict[str, str]:
    """The driver's non-secret object-store settings, for the workers it starts (a local Ray's
    workers do not inherit variables set after Ray started)."""
    return {k: v for k, v in os.environ.items()
            if k in _NON_SECRET_STORAGE_ENV or (k.startswith("AWS_ENDPOINT_URL") and "@" not in v)}


def is_remote(path: AnyPath) -> bool:
    return not isinstance(path, Path)


def read_parquet(path: AnyPath, columns: list[str] | None = None) -> pa.Table:
    if not is_remote(path):
        return pq.read_table(path, columns=columns)
    with path.open("rb") as handle:
        return pq.read_table(handle, columns=columns)


def read_parquet_subset(path: AnyPath, wanted: set[str]) -> pa.Table:
    """Only the ``wanted`` columns the file has, in the file's order (the footer is read first)."""
    with open_parquet(path) as reader:
        present = [name for name in reader.schema_arrow.names if name in wanted]
        return reader.read(columns=present)


@contextmanager
def open_parquet(path: AnyPath) -> Iterator[pq.ParquetFile]:
    """For streaming and footer reads; a remote file is read by ranges through one handle, closed at the end."""
    if not is_remote(path):
        with pq.ParquetFile(path) as reader:
            yield reader
    else:
        with path.open("rb") as handle, pq.ParquetFile(handle) as reader:
            yield reader


# Temporary names carry this mark, so a sweep of a run directory removes only what pairsift left.
_TEMP_MARK = ".pairsift-"
_TEMP_NAME = re.compile(r"\..+\.pairsift-\w+\.tmp")


def is_temp_name(name: str) -> bool:
    return _TEMP_NAME.fullmatch(name) is not None


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_temp_file(path: AnyPath) -> Path:
    """An empty local temporary file for ``path``: beside it on local disk (so a rename publishes it),
    in the system temp dir for an object store. Its mode is what the umask gives a new file (mkstemp
    makes 0600, and a rename keeps it: other users of a shared run could not read a part)."""
    directory = None  # the system temp dir: object stores have no rename, only whole uploads
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TEMP_MARK}", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path: AnyPath) -> Iterator[Path]:
    """Yield a local temporary path; publish it as ``path`` only if the block succeeds."""
    tmp = new_temp_file(path)
    try:
        yield Path(tmp)
        publish(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def publish(local: Path, path: AnyPath) -> None:
    """Move a finished local file to its final place in one step."""
    if is_remote(path):
        path.fs.put_file(str(local), path.path)
    else:
        os.replace(local, path)


def write_atomic(path: AnyPath, data: bytes | str | pa.Table) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, pa.Table):
            pq.write_table(data, tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def remove(path: AnyPath) -> None:
    try:
        path.unlink(missing_ok=True)
    except FileNotFoundError:  # some fsspec backends ignore missing_ok
        pass
