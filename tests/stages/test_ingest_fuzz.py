"""Fuzz: random bytes and structured garbage as every input format, and random configs. Each case
ends in a one-line UserError or in rows (with per-row reasons), never another exception, never a
run that silently ingests nothing."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pairsift.common.storage import read_parquet
from pairsift.pipeline.config import load_config, parse_config
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import ingest

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
_cases = itertools.count()


def ingest_outcome(folder, name: str, data: bytes, **input_options) -> str:
    """'error' (one line) or 'rows'; anything else fails the test."""
    case = folder / f"case-{next(_cases)}"
    case.mkdir()
    (case / name).write_bytes(data)
    cfg = parse_config({"run_dir": str(case / "run"),
                        "input": {"path": str(case / name), "shard_size": 5, **input_options}})
    try:
        n_shards = ingest(cfg, RunDir(case / "run"), "fuzz")
    except UserError as exc:
        assert str(exc).strip() and "\n" not in str(exc), repr(exc)
        event(f"error: {str(exc)[-60:]}")
        return "error"
    tables = [read_parquet(RunDir(case / "run").part("ingest", s)) for s in range(n_shards)]
    assert sum(t.num_rows for t in tables) > 0  # an empty ingest is an error, never a quiet success
    assert all({"uid", "url", "caption", "ingest_reason"} <= set(t.column_names) for t in tables)
    event("rows")
    return "rows"


NAMES = st.sampled_from(["l.csv", "l.tsv", "l.jsonl", "l.parquet", "l.txt", "l.tar", "l.csv.gz", "l.tar.gz"])


@FUZZ
@given(NAMES, st.binary(max_size=3000))
def test_random_bytes_in_every_format(tmp_path, name, data):
    ingest_outcome(tmp_path, name, data)


TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
CELL = st.one_of(TEXT, st.sampled_from(['"', '""', ",", "\t", "\n", "\r\n", "http://a/1.jpg", ""]))


def mangle(text: str, bad: list[int]) -> bytes:
    """UTF-8 with a few bytes flipped into invalid ones."""
    data = bytearray(text.encode("utf-8"))
    for position in bad:
        if data:
            data[position % len(data)] = 0xFF
    return bytes(data)


@FUZZ
@given(st.sampled_from([",", "\t"]), st.lists(st.lists(CELL, min_size=1, max_size=4), max_size=12),
       st.lists(st.integers(0, 10_000), max_size=3))
def test_delimited_garbage_under_a_real_header(tmp_path, sep, rows, bad):
    text = f"url{sep}caption{sep}reason\n" + "\n".join(sep.join(r) for r in rows) + "\n"
    ingest_outcome(tmp_path, "l.csv" if sep == "," else "l.tsv", mangle(text, bad))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=10)
RECORD = st.dictionaries(st.sampled_from(["url", "caption", "uid", "reason", "width", "x"]), JSON, max_size=5)


@FUZZ
@given(st.lists(st.one_of(RECORD, JSON), min_size=1, max_size=10), st.lists(st.integers(0, 10_000), max_size=2))
def test_jsonl_garbage(tmp_path, records, bad):
    text = "".join(json.dumps(r) + "\n" for r in records)
    ingest_outcome(tmp_path, "l.jsonl", mangle(text, bad))


COLUMN_TYPES = st.sampled_from([pa.string(), pa.binary(), pa.int64(), pa.float64(), pa.bool_(),
                                pa.list_(pa.string()), pa.null()])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["url", "caption", "uid", "reason", "WIDTH", "sha256", "source_url"]),
                          COLUMN_TYPES), min_size=1, max_size=5, unique_by=lambda c: c[0]),
       st.integers(0, 8), st.randoms(use_true_random=False))
def test_parquet_of_any_shape(tmp_path, columns, n_rows, rng):
    arrays = {}
    for name, kind in columns:
        values = [None if rng.random() < 0.2 else _value(kind, rng) for _ in range(n_rows)]
        arrays[name] = pa.array(values, kind)
    buffer = io.BytesIO()
    pq.write_table(pa.table(arrays) if arrays else pa.table({}), buffer)
    ingest_outcome(tmp_path, "l.parquet", buffer.getvalue())


def _value(kind: pa.DataType, rng) -> object:
    choices = {"string": f"http://a/{rng.randrange(9)} ü", "binary": bytes([rng.randrange(256)] * 3),
               "int64": rng.randrange(-5, 5), "double": rng.random(), "bool": rng.random() < 0.5,
               "list<item: string>": ["a", "b"], "null": None}
    return choices[str(kind)]


MEMBER = st.tuples(st.sampled_from(["0", "1", "a/b", ""]), st.sampled_from(["jpg", "txt", "json", "png", "x", ""]),
                   st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))


@FUZZ
@given(st.lists(MEMBER, max_size=8))
def test_tar_garbage(tmp_path, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}" if ext else key or "x")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ingest_outcome(tmp_path, "l.tar", buffer.getvalue())


# --- configs ----------------------------------------------------------------------------------

CONFIG_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                            max_leaves=8)
CONFIG = st.fixed_dictionaries({}, optional={
    "run_dir": CONFIG_VALUE, "input": st.dictionaries(st.sampled_from(
        ["path", "format", "url_col", "caption_col", "shard_size", "max_member_bytes", "max_tar_bytes"]),
        CONFIG_VALUE), "stages": st.lists(st.dictionaries(st.sampled_from(["stage", "label", "min_chars"]),
                                                          CONFIG_VALUE), max_size=2),
    "executor": CONFIG_VALUE, "shards": CONFIG_VALUE})


@FUZZ
@given(CONFIG)
def test_random_configs_parse_or_say_why_in_one_line(config):
    try:
        parse_config(config)
    except UserError as exc:
        assert str(exc).strip() and "\n" not in str(exc)


@FUZZ
@given(st.one_of(CONFIG.map(lambda c: yaml.safe_dump(c, allow_unicode=True)), st.text(max_size=300),
                 st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_random_yaml_loads_or_says_why_in_one_line(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(str(path))
    except UserError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
