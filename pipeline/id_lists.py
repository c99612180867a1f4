"""The id lists ``subset`` and ``takedown`` read: uids or urls, one a line (``#`` comments), or a
column of a parquet/csv/tsv file, streamed so a huge list never loads whole; a malformed uid is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pairsift.pipeline.errors import UserError

_UID = re.compile(r"[0-9a-f]{32}")


def read_id_list(path: Path, column: str) -> set[str]:
    """The ids in a list file: one per line, or the ``column`` of a parquet or csv file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected one {column} per line, or a parquet/csv with a '{column}' column)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        ids = _parquet_ids(path, column)
    elif suffix in (".csv", ".tsv"):
        ids = _csv_ids(path, column, "\t" if suffix == ".tsv" else ",")
    else:
        ids = _line_ids(path, column)
    if not ids:
        raise UserError(f"{path}: lists no {column}s")
    return ids


def _check_uid(value: str, where: str) -> None:
    if not _UID.fullmatch(value):
        raise UserError(f"{where}: {value[:60]!r} is not a uid (32 lowercase hex chars); for a URL list use --urls")


def _line_ids(path: Path, column: str) -> set[str]:
    ids: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            value = line.strip()
            if not value or value.startswith("#"):
                continue
            if column == "uid":
                _check_uid(value, f"{path} line {number}")
            ids.add(value)
    return ids


def _column_ids(values: pa.ChunkedArray | pa.Array, column: str, where: str) -> set[str]:
    ids = {str(v).strip() for v in values.to_pylist() if v is not None and str(v).strip()}
    if column == "uid":
        for value in ids:
            _check_uid(value, where)
    return ids


def _parquet_ids(path: Path, column: str) -> set[str]:
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"{path}: not a readable parquet file: {exc}") from None
    if column not in file.schema_arrow.names:
        raise UserError(f"{path}: has no '{column}' column (columns: {', '.join(file.schema_arrow.names)})")
    ids: set[str] = set()
    for batch in file.iter_batches(columns=[column], batch_size=65_536):  # a huge list never loads whole
        ids |= _column_ids(batch.column(0), column, str(path))
    return ids


def _csv_ids(path: Path, column: str, delimiter: str) -> set[str]:
    try:
        reader = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                convert_options=pacsv.ConvertOptions(include_columns=[column],
                                                                     column_types={column: pa.string()}))
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise UserError(f"{path}: cannot read a '{column}' column from it: {str(exc).splitlines()[0]}") from None
    ids: set[str] = set()
    for batch in reader:
        ids |= _column_ids(batch.column(0), column, str(path))
    return ids
