"""The input readers: which files an input names, and each format read as a stream of Arrow tables.

An input is a file, a folder or a glob, as img2dataset takes them: a folder of parquet (or csv, tsv,
jsonl, txt) files, a glob such as ``data/*.parquet``, a ``.txt`` URL list (one URL per line, no
caption), or webdataset tars. Files whose names start with ``_`` or ``.`` are skipped, as Spark,
Hive and Ray skip them.

Hostile input never becomes an exception out of a reader other than a one-line ValueError: bytes
that are not UTF-8 are decoded per value with U+FFFD and the row gets ``ingest_reason`` =
``bad_encoding``; webdataset members are streamed with a per-member and a per-tar byte cap, a
refused member leaves its row without an image (``ingest_reason`` = ``member_too_large``), and a
sample json that is invalid, too deep or has a url that is not text is ``bad_json`` / ``bad_url``.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pairsift.common.images import EXTENSIONS as IMAGE_EXTENSIONS
from pairsift.common.storage import AnyPath, as_path, is_remote, open_parquet
from pairsift.common.tars import Member, TarError, iter_members, split_name
from pairsift.stages.base import IMAGE

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt", "webdataset")
INGEST_REASON = "ingest_reason"  # null = read cleanly; else what was wrong with the row's input
# The readers' own per-row reasons, under a name no input column gets (those are prefixed later).
READER_REASON = "__ingest_reason"
BAD_ENCODING, BAD_ROW, BAD_JSON, BAD_URL = "bad_encoding", "bad_row", "bad_json", "bad_url"
MEMBER_TOO_LARGE = "member_too_large"
READ_ROWS = 65_536
MAX_JSON_FIELDS = 64
_SUFFIXES = {"parquet": (".parquet",), "csv": (".csv",), "tsv": (".tsv",), "jsonl": (".jsonl", ".json"),
             "txt": (".txt",), "webdataset": (".tar",)}
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class TarLimits:
    """Bytes a webdataset input may make ingest read: one member, and one tar's whole stream."""

    max_member_bytes: int = 64 << 20
    max_tar_bytes: int = 16 << 30


def format_of_name(name: str) -> str | None:
    name = name.lower().removesuffix(".gz")
    return next((fmt for fmt, suffixes in _SUFFIXES.items() if name.endswith(suffixes)), None)


def input_files(location: str | AnyPath, fmt: str = "auto") -> tuple[list[AnyPath], str]:
    """The files an input names (a file, a folder or a glob), in name order, and their one format."""
    text = str(location)
    if any(c in text for c in _GLOB_CHARS) and not as_path(location).exists():
        files = _glob(text)
        if not files:
            raise ValueError(f"input {text}: the pattern matches no file")
    else:
        source = as_path(location)
        if not source.exists():
            raise ValueError(f"input {source} does not exist")
        files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
        if source.is_dir():
            files = [p for p in files if not p.name.startswith(("_", "."))]
    if fmt != "auto":  # a folder's files of that format (any file, if none is named like one)
        named = [p for p in files if format_of_name(p.name) == fmt]
        return named or files, fmt
    formats = {f for f in (format_of_name(p.name) for p in files) if f}
    if len(files) == 1 and not formats:
        raise ValueError(f"{files[0]}: cannot tell the format from the name; set input.format to one of {FORMATS}")
    if len(formats) != 1:
        found = ", ".join(sorted(formats)) or "no file of a known format"
        raise ValueError(f"input {text}: expected files of one format ({', '.join(FORMATS)}); found {found}")
    fmt = formats.pop()
    return [p for p in files if format_of_name(p.name) == fmt], fmt


def _glob(pattern: str) -> list[AnyPath]:
    path = as_path(pattern)
    if is_remote(path):
        protocol = pattern.split("://", 1)[0]
        return sorted(as_path(f"{protocol}://{p}") for p in path.fs.glob(path.path))
    return [as_path(p) for p in sorted(glob.glob(pattern, recursive=True)) if as_path(p).is_file()]


def _open_maybe_gzip(path: AnyPath) -> io.BufferedIOBase:
    gzipped = path.name.endswith(".gz")
    if is_remote(path):
        return path.fs.open(path.path, "rb", compression="gzip" if gzipped else None)
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_batches(path: AnyPath, fmt: str, limits: TarLimits) -> Iterator[pa.Table]:
    """Stream one file as tables of up to READ_ROWS rows (whole files are never loaded at once)."""
    if fmt not in _READERS:
        raise ValueError(f"unsupported format {fmt}; input.format is one of {FORMATS}")
    try:
        yield from _READERS[fmt](path, limits)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, EOFError, TarError, ValueError, zlib.error,
            lzma.LZMAError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if first_line.startswith(str(path)):
            raise ValueError(first_line) from None
        raise ValueError(f"{path}: cannot read as {fmt}: {first_line}") from None


def _read_parquet(path: AnyPath, _: TarLimits) -> Iterator[pa.Table]:
    # One row group at a time: over the whole file, iter_batches pre-buffers every row group's
    # bytes up front (peak memory grew with the file: +338 MB reading a 213 MB file, +82 MB so).
    with open_parquet(path) as reader:
        for group in range(reader.num_row_groups):
            for batch in reader.iter_batches(batch_size=READ_ROWS, row_groups=[group]):
                yield pa.Table.from_batches([batch])


def _read_csv(path: AnyPath, delimiter: str) -> Iterator[pa.Table]:
    """Every column as text: a later block cannot fail a type guessed on the first. The bytes are
    decoded on the way in (``_Utf8Repair``), so one bad byte costs one value, not the column.
    A line with the wrong number of fields becomes a row of nulls with reason ``bad_row``."""
    skipped = _SkippedLines()
    parse = pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=delimiter == ",",
                              invalid_row_handler=skipped)
    read = pcsv.ReadOptions(block_size=1 << 22)
    with _open_maybe_gzip(path) as handle:
        names = pcsv.open_csv(_Utf8Repair(handle), parse_options=parse, read_options=read).schema.names
    skipped.count = 0
    convert = pcsv.ConvertOptions(strings_can_be_null=False, column_types={n: pa.string() for n in names})
    with _open_maybe_gzip(path) as handle:
        for batch in pcsv.open_csv(_Utf8Repair(handle), parse_options=parse, convert_options=convert,
                                   read_options=read):
            yield _with_reasons(pa.Table.from_batches([batch]), skipped.take())
    if skipped.count:
        empty = pa.Table.from_arrays([pa.array([], pa.string())] * len(names), names=names)
        yield _with_reasons(empty, skipped.take())


class _Utf8Repair(io.RawIOBase):
    """A byte stream re-encoded as valid UTF-8: invalid bytes become U+FFFD (pyarrow would make the
    whole column binary, and its invalid-row handler fails on such a line)."""

    def __init__(self, inner: io.BufferedIOBase):
        super().__init__()
        self.inner = inner
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        while not self.pending:
            chunk = self.inner.read(1 << 20)
            self.pending = self.decoder.decode(chunk, final=not chunk).encode("utf-8")
            if not chunk:
                break
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size


class _SkippedLines:
    """pyarrow's invalid_row_handler: skip a malformed line, but count it (it is reported as a row)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _row: object) -> str:
        self.count += 1
        return "skip"

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _with_reasons(table: pa.Table, bad_rows: int = 0) -> pa.Table:
    """Rows with a repaired byte (U+FFFD in any value) get ``bad_encoding``; ``bad_rows`` rows of
    nulls (for malformed lines) are added with ``bad_row``."""
    repaired = np.zeros(table.num_rows, bool)
    for column in table.columns:
        repaired |= pc.fill_null(pc.match_substring(column, "\ufffd"), False).to_numpy(zero_copy_only=False)
    reasons = [BAD_ENCODING if r else None for r in repaired.tolist()] + [BAD_ROW] * bad_rows
    columns = [pa.concat_arrays([*c.chunks, pa.nulls(bad_rows, pa.string())]) if bad_rows else c
               for c in table.columns]
    return pa.Table.from_arrays([*columns, pa.array(reasons, pa.string())],
                                names=[*table.column_names, READER_REASON])


def _read_comma(path: AnyPath, _: TarLimits) -> Iterator[pa.Table]:
    return _read_csv(path, ",")


def _read_tab(path: AnyPath, _: TarLimits) -> Iterator[pa.Table]:
    return _read_csv(path, "\t")


def _scalar_text(value: object) -> object:
    """Keep strings; numbers become text; anything else (lists, objects) becomes null."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) or value is None else None


def _read_jsonl(path: AnyPath, _: TarLimits) -> Iterator[pa.Table]:
    """JSON lines read one by one: one odd line (a number for a url, bad UTF-8) must not sink the file.

    Values are normalised per row (text stays text, numbers become text, the rest null); a line
    that is not a JSON object is a row of nulls with reason ``bad_json``."""
    rows: list[dict] = []
    with _open_maybe_gzip(path) as handle:
        for raw in handle:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # deep nesting recurses past Python's limit
                record = None
            if isinstance(record, dict):
                row = {str(k): _scalar_text(v) for k, v in record.items()}
                row[READER_REASON] = None if _is_utf8(raw) else BAD_ENCODING
            else:
                row = {READER_REASON: BAD_JSON}
            rows.append(row)
            if len(rows) == READ_ROWS:
                yield _rows_to_table(rows)
                rows = []
    if rows:
        yield _rows_to_table(rows)


def _rows_to_table(rows: list[dict]) -> pa.Table:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({n: pa.array([row.get(n) for row in rows], pa.string()) for n in names})


def _read_txt(path: AnyPath, _: TarLimits) -> Iterator[pa.Table]:
    """A URL list: one URL per line, surrounding whitespace and blank lines ignored, no caption."""
    urls: list[str] = []
    reasons: list[str | None] = []
    with _open_maybe_gzip(path) as handle:
        for raw in handle:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                urls.append(line)
                reasons.append(None if _is_utf8(raw) else BAD_ENCODING)
            if len(urls) == READ_ROWS:
                yield pa.table({"url": urls, READER_REASON: pa.array(reasons, pa.string())})
                urls, reasons = [], []
    if urls:
        yield pa.table({"url": urls, READER_REASON: pa.array(reasons, pa.string())})


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def as_text(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, list[bool]]:
    """Text as strings, bytes decoded per value (invalid UTF-8 replaced with U+FFFD), numbers as
    text, anything else (lists, structs) null. Also returns, per row, whether its bytes were repaired."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return pc.cast(column, pa.string()), [False] * len(column)
    if not any(t(column.type) for t in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                         pa.types.is_large_binary, pa.types.is_null)):
        return pa.chunked_array([pa.nulls(len(column), pa.string())]), [False] * len(column)
    raw = column.cast(pa.large_binary()).combine_chunks()
    if not _valid_utf8(raw):
        return _repaired(raw)
    text = raw.view(pa.large_string())
    try:
        text = text.cast(pa.string())
    except pa.ArrowInvalid:  # over 2 GB of text in one batch: keep it large
        pass
    return pa.chunked_array([text]), [False] * len(column)


def _valid_utf8(raw: pa.Array) -> bool:
    try:
        raw.view(pa.large_string()).validate(full=True)  # one SIMD pass over the bytes
        return True
    except pa.ArrowInvalid:
        return False


def _repaired(raw: pa.Array) -> tuple[pa.ChunkedArray, list[bool]]:
    values, bad = [], []
    for value in raw.to_pylist():
        if value is None:
            values.append(None)
            bad.append(False)
            continue
        values.append(value.decode("utf-8", "replace"))
        bad.append(not _is_utf8(value))
    return pa.chunked_array([pa.array(values, pa.string())]), bad


# --- webdataset --------------------------------------------------------------------------------

def _read_webdataset(path: AnyPath, limits: TarLimits) -> Iterator[pa.Table]:
    """Samples of a webdataset tar (img2dataset output), streamed member by member: url from the
    json, caption from the txt (or the json), the image; a sample's members are adjacent."""
    with path.open("rb") as raw:
        rows: list[dict] = []
        row: dict | None = None
        for member in iter_members(_tar_stream(raw)):
            if member.end > limits.max_tar_bytes:
                raise ValueError(f"{path}: the tar is over input.max_tar_bytes ({limits.max_tar_bytes:,} bytes "
                                 "read); raise it or split the tar")
            key, ext = split_name(member.name)
            if not member.is_file() or not ext:
                continue
            if row is None or row["source_key"] != key:
                row = {"source_key": key, "url": None, "caption": None, IMAGE: None, INGEST_REASON: None}
                rows.append(row)
            _add_member(row, ext, member, limits)
            if len(rows) > READ_ROWS:
                yield _samples_table(path, rows[:-1])
                rows = rows[-1:]
        if rows:
            yield _samples_table(path, rows)


_DECOMPRESSORS = {b"\x1f\x8b": lambda raw: gzip.GzipFile(fileobj=raw), b"BZh": bz2.BZ2File,
                  b"\xfd7zXZ": lzma.LZMAFile}


def _tar_stream(raw: io.BufferedIOBase) -> io.IOBase:
    """The tar's bytes: the file itself (a skipped member is one seek), or decompressed through
    ``_ForwardReader`` (a skipped member is read past in big chunks, never held)."""
    head = raw.read(6)
    raw.seek(0)
    for magic, opener in _DECOMPRESSORS.items():
        if head.startswith(magic):
            return _ForwardReader(opener(raw))
    return raw


class _ForwardReader(io.RawIOBase):
    """A decompressed stream tarfile can seek forward in: a gzip bomb's 1.5 GB member is skipped in
    16 MB reads (tarfile's own stream mode reads 10 KB at a time: minutes per GB)."""

    def __init__(self, inner: io.BufferedIOBase):
        super().__init__()
        self.inner = inner
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.position + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self.position:
            raise OSError("a compressed tar is read forwards only")
        while self.position < target and self.read(min(target - self.position, 16 << 20)):
            pass
        return self.position


def _add_member(row: dict, ext: str, member: Member, limits: TarLimits) -> None:
    if ext not in (*IMAGE_EXTENSIONS, "txt", "json"):
        return
    if member.size > limits.max_member_bytes:  # never read: a sparse member declares GBs in a few KB
        row[INGEST_REASON] = MEMBER_TOO_LARGE
        return
    data = member.read(limits.max_member_bytes + 1)
    if len(data) > limits.max_member_bytes:
        row[INGEST_REASON] = MEMBER_TOO_LARGE
    elif ext in IMAGE_EXTENSIONS:
        row[IMAGE] = data
    elif ext == "txt":
        row["caption"] = _decoded(row, data)
    else:
        _add_json(row, _decoded(row, data))


def _decoded(row: dict, data: bytes) -> str:
    if not _is_utf8(data):
        row[INGEST_REASON] = row[INGEST_REASON] or BAD_ENCODING
    return data.decode("utf-8", "replace")


def _add_json(row: dict, text: str) -> None:
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting recurses past Python's limit
        meta = None
    if not isinstance(meta, dict):
        row[INGEST_REASON] = BAD_JSON
        return
    url = meta.get("url")
    if isinstance(url, str):
        row["url"] = url
    elif url is not None:
        row[INGEST_REASON] = BAD_URL
    if row["caption"] is None and isinstance(meta.get("caption"), str):
        row["caption"] = meta["caption"]
    # The json's other fields are the sample's input columns (img2dataset's "key" repeats the tar key).
    row["fields"] = {f"source_{k}": _scalar_text(v) for k, v in meta.items() if k not in ("url", "caption", "key")}


def _samples_table(path: AnyPath, rows: list[dict]) -> pa.Table:
    """The samples, with the json's fields as text columns (the first MAX_JSON_FIELDS names seen:
    json with a new key per sample must not become a table of thousands of columns)."""
    for row in rows:  # a sample without a url is named after where it came from
        row["url"] = row["url"] or f"{path.name}/{row['source_key']}"
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), (IMAGE, pa.binary()),
                        ("source_key", pa.string()), (INGEST_REASON, pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    names = list(dict.fromkeys(n for row in rows for n in row.get("fields", {})))[:MAX_JSON_FIELDS]
    for name in names:
        table = table.append_column(name, pa.array([row.get("fields", {}).get(name) for row in rows], pa.string()))
    return table


_READERS = {"parquet": _read_parquet, "csv": _read_comma, "tsv": _read_tab, "jsonl": _read_jsonl,
            "txt": _read_txt, "webdataset": _read_webdataset}
