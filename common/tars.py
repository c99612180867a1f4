"""The one place webdataset tars are written and read.

A webdataset sample is the run of adjacent members sharing a key: ``KEY.jpg``, ``KEY.txt``,
``KEY.json``. The key is webdataset's: the member path up to the first dot of its file name
(``split_name``), so what pairsift writes reads back the same in webdataset, wids and open_clip.

- Writing: ``write_tar`` gives a ``TarWriter`` whose file appears whole (``storage.atomic_path``).
  Members get fixed headers (mtime 0, uid/gid 0, mode 0644, no owner names), so the same samples
  give the same bytes: resumed, retried and rerun shards compare equal. The format is tarfile's
  pax: a plain ustar header for every short ASCII name, an extended header only when a name needs
  one. (webdataset's ``TarWriter`` takes encoded sample dicts and writes owner names and read-only
  modes; copying a member's header unchanged, which subsets and takedowns need, it cannot do.)
- Streaming: ``iter_members`` yields members one at a time and keeps no header it has passed, so a
  tar of any size costs one member's worth of memory; data is read only when asked for.
- Random access: ``index_members`` reads only the 512-byte headers of a plain ustar file (what
  webdataset writers produce), about 5x faster than tarfile, and falls back to tarfile for pax/GNU
  extensions; ``read_keys`` reads only the wanted members, by offset.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pairsift.common.storage import AnyPath, as_path, atomic_path

TarError = tarfile.TarError  # what the streaming reader raises for bytes that are not a whole tar
Span = tuple[str, int, int]  # (member name, offset of its data, size): what random access needs
_BLOCK = 512


def split_name(name: str) -> tuple[str, str]:
    """webdataset's ``(key, extension)`` of a member name: ``a/b.seg.jpg`` -> ``("a/b", "seg.jpg")``.
    The extension is lower-cased; a name without a dot in its file name is all key, extension ''."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


# --- writing -------------------------------------------------------------------------------------

class TarWriter:
    """Adds members to an open tar: new ones with reproducible headers, or copies of read ones."""

    def __init__(self, tar: tarfile.TarFile):
        self._tar = tar

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)  # uid/gid 0, mode 0644, no owner names: same samples, same bytes
        info.size = len(data)
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(data))
        self._tar.members.clear()  # tarfile keeps a list of what it wrote: memory would grow with the tar

    def add_sample(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self.add(name, data)

    def copy(self, member: Member) -> None:
        """``member`` with its header unchanged and its data streamed (never decoded, never held)."""
        self._tar.addfile(member.info, member.data)
        self._tar.members.clear()


@contextmanager
def tar_writer(local: Path) -> Iterator[TarWriter]:
    """A writer straight to the local file ``local`` (the caller publishes it)."""
    with tarfile.open(local, "w", format=tarfile.PAX_FORMAT) as tar:
        yield TarWriter(tar)


@contextmanager
def write_tar(path: AnyPath) -> Iterator[TarWriter]:
    """A writer whose tar appears at ``path`` (local or object storage) whole, when the block succeeds."""
    with atomic_path(path) as tmp, tar_writer(tmp) as writer:
        yield writer


# --- streaming -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    info: tarfile.TarInfo
    end: int  # bytes of the tar up to the end of this member's data: what a cap on input size checks
    data: IO[bytes] | None  # a reader of the data, for regular files only

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def size(self) -> int:
        return self.info.size

    def is_file(self) -> bool:
        return self.data is not None

    def read(self, limit: int = -1) -> bytes:
        """The data (at most ``limit`` bytes); ``b""`` for anything but a regular file."""
        return self.data.read(limit) if self.data else b""


def iter_members(stream: IO[bytes]) -> Iterator[Member]:
    """The members of the tar in ``stream``, in order. Read a member's data before asking for the
    next one; what is left of it is skipped (by seeking where ``stream`` can seek forward, else read
    through). Raises ``TarError`` for bytes that are not a tar or end inside a member."""
    with tarfile.open(fileobj=stream, mode="r:" if stream.seekable() else "r|") as tar:
        for info in tar:
            tar.members.clear()  # tarfile keeps every header it read: memory would grow with the tar
            yield Member(info, tar.offset, tar.extractfile(info) if info.isfile() else None)


def members_of(path: AnyPath) -> Iterator[Member]:
    """``iter_members`` of the tar at ``path`` (local or object storage: never held whole)."""
    with as_path(path).open("rb") as handle:
        yield from iter_members(handle)


# --- random access -------------------------------------------------------------------------------

class DamagedTar(Exception):
    """The tar ends inside a member or a header is corrupt: the members before it were readable."""


class _NotPlainUstar(Exception):
    """The tar uses pax/GNU extensions or odd members: let the standard library read it."""


def _ustar_spans(f: IO[bytes]) -> Iterator[Span]:
    """The regular files of a plain ustar file, from its headers only (the data is seeked over)."""
    end = f.seek(0, io.SEEK_END)
    pos = 0
    while pos + _BLOCK <= end:
        f.seek(pos)
        header = f.read(_BLOCK)
        if header.count(0) == _BLOCK:  # end-of-archive block
            return
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            if not pos:
                raise _NotPlainUstar  # let tarfile produce its own diagnosis
            raise DamagedTar(f"bad header checksum at byte {pos}")
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"5") or header[124] & 0x80:
            raise _NotPlainUstar
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345]:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if pos + _BLOCK + size > end:
            raise DamagedTar(f"unexpected end of data in {name}")
        if kind != b"5":
            yield name, pos + _BLOCK, size
        pos += _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    if pos != end:
        raise DamagedTar("unexpected end of data")


def _tarfile_spans(f: IO[bytes]) -> Iterator[Span]:
    f.seek(0)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # each header read seeks to its own offset
            for member in tar:
                if member.isfile():
                    yield member.name, member.offset_data, member.size
    except (tarfile.TarError, EOFError) as err:
        raise DamagedTar(f"{type(err).__name__}: {err}") from err


def _spans(f: IO[bytes]) -> Iterator[Span]:
    """Every regular file's span: the header scan, or all of tarfile's reading when the scan meets
    an extension (a caller that already took some spans gets them again, in the same order). A
    caller may read from ``f`` between spans."""
    try:
        yield from _ustar_spans(f)
    except _NotPlainUstar:
        yield from _tarfile_spans(f)


def index_members(path: AnyPath) -> tuple[list[Span], str | None]:
    """Every regular file's span, in file order, and ``None``; for a damaged tar, the spans that
    were readable and what went wrong."""
    spans: dict[tuple[str, int], Span] = {}  # keyed by place: a tarfile fallback repeats earlier ones
    try:
        with as_path(path).open("rb") as f:
            for span in _spans(f):
                spans[span[:2]] = span
    except DamagedTar as err:
        return list(spans.values()), str(err)
    except OSError as err:
        return list(spans.values()), f"{type(err).__name__}: {err}"
    return list(spans.values()), None


def read_keys(path: AnyPath, wanted: Collection[str], extensions: Collection[str]) -> dict[str, bytes]:
    """key -> data of the members with a wanted key and one of ``extensions``, reading no other
    member's data and stopping once every wanted key is found. A missing or damaged tar gives what
    was readable (a caller shows the rest as not found)."""
    found: dict[str, bytes] = {}
    try:
        with as_path(path).open("rb") as f:
            for name, offset, size in _spans(f):
                key, ext = split_name(name)
                if key in wanted and ext in extensions:
                    f.seek(offset)
                    found[key] = f.read(size)
                    if len(found) == len(wanted):
                        break
    except (DamagedTar, OSError):
        pass
    return found


# --- samples by key ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRef:
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


def index_tar(path: AnyPath) -> tuple[list[SampleRef], str | None]:
    """A tar's members grouped by webdataset key, in file order. A damaged tar yields what was
    readable and what went wrong (``index_members``)."""
    refs: dict[str, dict[str, tuple[int, int]]] = {}
    spans, error = index_members(path)
    for name, offset, size in spans:
        key, ext = split_name(name)
        if ext:
            refs.setdefault(key, {})[ext] = (offset, size)
    return [SampleRef(k, v) for k, v in refs.items()], error


def read_members(f: IO[bytes], ref: SampleRef) -> dict[str, bytes]:
    """extension -> data of one indexed sample, read by offset from its open tar."""
    out = {}
    for ext, (offset, size) in ref.members.items():
        f.seek(offset)
        out[ext] = f.read(size)
    return out


def iter_tar_samples(path: AnyPath) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of one tar in file order: ``(key, extension -> data)``."""
    refs, _ = index_tar(path)
    with as_path(path).open("rb") as f:
        for ref in refs:
            yield ref.key, read_members(f, ref)
