"""Ingest: read a URL list (or existing webdataset tars) and cut it into input shards with uids.

Every row gets a ``uid`` (32 hex chars of blake2b over url and caption) and two flags the text filter
turns into reasons: ``dup_url`` (the url appeared earlier in the pool) and ``dup_url_caption`` (the
exact pair appeared earlier). An exact repeat gets the uid of its pair plus its repeat number, so that
every input row keeps its own line in the catalog.

Dedup is exact and happens here because ingest is the one place that sees the whole pool in order;
it keeps one 8-byte digest per distinct url and pair in memory (about 100 bytes each in Python sets).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from stages.base import IMAGE

FORMATS = ("parquet", "csv", "tsv", "jsonl", "webdataset")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_READ_ROWS = 65_536


def uid_of(url: str | None, caption: str | None, repeat: int = 0) -> str:
    text = f"{url or ''}\x00{caption or ''}"
    if repeat:
        text += f"\x00{repeat}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _short_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any(path.glob("*.tar")):
            return "webdataset"
        raise ValueError(f"{path}: a directory input must hold webdataset .tar files")
    name = path.name.lower().removesuffix(".gz")
    for fmt, suffixes in {
        "parquet": (".parquet",),
        "csv": (".csv",),
        "tsv": (".tsv",),
        "jsonl": (".jsonl", ".json"),
        "webdataset": (".tar",),
    }.items():
        if name.endswith(suffixes):
            return fmt
    raise ValueError(f"{path}: cannot tell the format from the name; set input.format to one of {FORMATS}")


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_batches(path: Path, fmt: str) -> Iterator[pa.Table]:
    """Stream the list as tables of up to _READ_ROWS rows (whole files are never loaded at once)."""
    if fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_READ_ROWS):
            yield pa.Table.from_batches([batch])
    elif fmt in ("csv", "tsv"):
        parse = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=fmt == "csv")
        convert = pcsv.ConvertOptions(strings_can_be_null=False)
        with _open_maybe_gzip(path) as handle:
            reader = pcsv.open_csv(handle, parse_options=parse, convert_options=convert,
                                   read_options=pcsv.ReadOptions(block_size=1 << 22))
            for batch in reader:
                yield pa.Table.from_batches([batch])
    elif fmt == "jsonl":
        yield from _read_jsonl(path)
    else:
        raise ValueError(f"unsupported format {fmt}")


def _scalar_text(value: object) -> object:
    """Keep strings; numbers become text; anything else (lists, objects) becomes null."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) or value is None else None


def _read_jsonl(path: Path) -> Iterator[pa.Table]:
    """JSON lines read one by one: one odd line (a number for a url, bad UTF-8) must not sink the file.

    Values are normalised per row (text stays text, numbers become text, the rest null); a line
    that is not JSON at all is a one-line error with its line number."""
    rows: list[dict] = []
    with _open_maybe_gzip(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object: {exc}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            rows.append({str(k): _scalar_text(v) for k, v in record.items()})
            if len(rows) == _READ_ROWS:
                yield _rows_to_table(rows)
                rows = []
    if rows:
        yield _rows_to_table(rows)


def _rows_to_table(rows: list[dict]) -> pa.Table:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({n: pa.array([row.get(n) for row in rows], pa.string()) for n in names})


def _tar_paths(path: Path) -> list[Path]:
    return sorted(path.glob("*.tar")) if path.is_dir() else [path]


def _read_webdataset(path: Path) -> Iterator[pa.Table]:
    """Samples of existing webdataset tars (img2dataset output): url from the json, caption from txt."""
    for tar_path in _tar_paths(path):
        rows: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile() or "." not in member.name:
                    continue
                key, ext = member.name.rsplit(".", 1)
                handle = tar.extractfile(member)
                data = handle.read() if handle else b""
                row = rows.setdefault(key, {"key": key})
                if ext.lower() in IMAGE_EXTENSIONS:
                    row[IMAGE] = data
                elif ext == "txt":
                    row["caption"] = data.decode("utf-8", "replace")
                elif ext == "json":
                    try:
                        meta = json.loads(data)
                    except ValueError:
                        meta = {}
                    if isinstance(meta, dict):
                        row["url"] = meta.get("url")
                        row.setdefault("caption", meta.get("caption"))
        for row in rows.values():
            row["url"] = row.get("url") or f"{tar_path.name}/{row['key']}"
        if rows:
            yield pa.Table.from_pylist(
                [{"url": r["url"], "caption": r.get("caption"), IMAGE: r.get(IMAGE), "source_key": r["key"]}
                 for r in rows.values()],
                schema=pa.schema([("url", pa.string()), ("caption", pa.string()), (IMAGE, pa.binary()),
                                  ("source_key", pa.string())]),
            )


def _as_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Url and caption as strings; values that are not text (numbers, lists) become null."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return pc.cast(column, pa.string())
    return pa.chunked_array([pa.nulls(len(column), pa.string())])


def _normalise(table: pa.Table, url_col: str, caption_col: str, source: Path) -> pa.Table:
    names = table.column_names
    for wanted, key in ((url_col, "url_col"), (caption_col, "caption_col")):
        if wanted not in names:
            raise ValueError(
                f"{source}: column {wanted!r} not found (set input.{key}); columns are: {', '.join(names)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: duplicate column names: {', '.join(names)}")
    url = _as_strings(table.column(url_col))
    caption = _as_strings(table.column(caption_col))
    extras = [n for n in names if n not in (url_col, caption_col) and n not in ("uid", "url", "caption")]
    columns = {"url": url, "caption": caption}
    columns.update({n: table.column(n) for n in extras})
    return pa.table(columns)


class UidAssigner:
    """Assigns uids and duplicate flags in input order, remembering what the pool has shown so far."""

    def __init__(self) -> None:
        self.seen_urls: set[bytes] = set()
        self.pair_repeats: dict[bytes, int] = {}

    def __call__(self, table: pa.Table) -> pa.Table:
        uids, dup_url, dup_pair = [], [], []
        for url, caption in zip(table.column("url").to_pylist(), table.column("caption").to_pylist()):
            url_key = _short_digest(url or "")
            pair_key = _short_digest(f"{url or ''}\x00{caption or ''}")
            repeat = self.pair_repeats.get(pair_key, -1) + 1
            self.pair_repeats[pair_key] = repeat
            dup_pair.append(repeat > 0)
            dup_url.append(url_key in self.seen_urls)
            self.seen_urls.add(url_key)
            uids.append(uid_of(url, caption, repeat))
        return (
            table.add_column(0, "uid", pa.array(uids, pa.string()))
            .append_column("dup_url", pa.array(dup_url, pa.bool_()))
            .append_column("dup_url_caption", pa.array(dup_pair, pa.bool_()))
        )


def iter_input_shards(
    path: str | Path, fmt: str = "auto", url_col: str = "url", caption_col: str = "caption",
    shard_size: int = 10_000,
) -> Iterator[pa.Table]:
    """Yield the input as consecutive shards of ``shard_size`` rows, each with uid and dup flags.

    Raises ValueError (one line) for a missing file, an unknown format or missing columns."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"input {source} does not exist")
    fmt = detect_format(source) if fmt == "auto" else fmt
    assign = UidAssigner()
    if fmt == "webdataset":
        batches = _read_webdataset(source)
    else:
        batches = (_normalise(t, url_col, caption_col, source) for t in _read_batches_checked(source, fmt))
    pending: list[pa.Table] = []
    pending_rows = 0
    for batch in batches:
        pending.append(assign(batch))
        pending_rows += batch.num_rows
        while pending_rows >= shard_size:
            merged = pa.concat_tables(pending, promote_options="permissive").combine_chunks()
            yield merged.slice(0, shard_size)
            rest = merged.slice(shard_size)
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
    if pending_rows:
        yield pa.concat_tables(pending, promote_options="permissive").combine_chunks()


def _read_batches_checked(source: Path, fmt: str) -> Iterator[pa.Table]:
    try:
        yield from _read_batches(source, fmt)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, EOFError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{source}: cannot read as {fmt}: {first_line}") from None
