"""The CLI's machine-readable output (`status` / `query` --format csv|json|parquet, --out) and `validate`."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pairsift.pipeline.cli import app
from pairsift.pipeline.config import parse_config
from pairsift.pipeline.runner import run_pipeline

N = 300  # above the table's 200-row cap
LONG = "a long caption, with commas, \"quotes\" and a newline\nthat a terminal table would cut " + "x" * 300


def caption(i: int) -> str:
    if i % 10 == 0:
        return "tiny"  # dropped: caption_too_short
    return f"{i} {LONG} ünïcödé"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real local run: ingest and the text filter over N rows, 30 of them too short."""
    root = tmp_path_factory.mktemp("cli")
    rows = [{"url": f"http://127.0.0.1:1/{i}.jpg", "caption": caption(i)} for i in range(N)]
    pq.write_table(pa.Table.from_pylist(rows), root / "pool.parquet")
    cfg = {"run_dir": str(root / "run"), "input": {"path": str(root / "pool.parquet"), "shard_size": 100},
           "executor": {"kind": "local"},
           "stages": [{"stage": "text_filter", "languages": None, "max_chars": None, "max_words": None}],
           "shards": {"samples_per_shard": 100}}
    assert not run_pipeline(parse_config(cfg)).failed
    return root / "run"


def cli_result(*args: str):
    return CliRunner().invoke(app, list(args))


def cli(*args: str) -> str:
    result = cli_result(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_query_csv_and_json_hold_every_row_and_every_character(run_dir):
    sql = "SELECT uid, caption, reason FROM samples ORDER BY caption"
    parsed = list(csv.DictReader(io.StringIO(cli("query", str(run_dir), sql, "--format", "csv"))))
    assert len(parsed) == N  # no 200-row cap
    assert sorted(r["caption"] for r in parsed) == sorted(caption(i) for i in range(N))  # nothing cut
    assert sum(r["reason"] == "caption_too_short" for r in parsed) == N // 10
    assert sum(r["reason"] == "" for r in parsed) == N - N // 10  # NULL is an empty cell
    as_json = json.loads(cli("query", str(run_dir), sql, "--format", "json"))
    assert [r["caption"] for r in as_json] == [r["caption"] for r in parsed]
    assert sum(r["reason"] is None for r in as_json) == N - N // 10  # NULL is null


def test_query_writes_a_file_with_out_and_parquet_keeps_types(run_dir, tmp_path):
    sql = "SELECT reason, count(*) AS n FROM samples GROUP BY 1 ORDER BY 2"
    out = tmp_path / "q.csv"
    assert cli("query", str(run_dir), sql, "--format", "csv", "--out", str(out)) == ""
    assert list(csv.reader(out.open())) == [["reason", "n"], ["caption_too_short", "30"], ["", "270"]]
    cli("query", str(run_dir), sql, "--format", "parquet", "--out", str(tmp_path / "q.parquet"))
    table = pq.read_table(tmp_path / "q.parquet")
    assert table.to_pylist() == [{"reason": "caption_too_short", "n": 30}, {"reason": None, "n": 270}]
    assert pa.types.is_integer(table.schema.field("n").type)


def test_csv_and_json_write_any_duckdb_type(run_dir):
    typed = "DATE '2024-01-02' AS d, '\\x01\\xFF'::BLOB AS b, [1, 2] AS l, {'k': 3} AS s, MAP {'x': 1} AS m"
    rows = list(csv.reader(io.StringIO(cli("query", str(run_dir), f"SELECT 1 AS a, 2 AS a, {typed}", "--format", "csv"))))
    assert rows == [["a", "a", "d", "b", "l", "s", "m"], ["1", "2", "2024-01-02", "01ff", "[1, 2]", '{"k": 3}', '{"x": 1}']]
    assert json.loads(cli("query", str(run_dir), f"SELECT {typed}", "--format", "json")) == [
        {"d": "2024-01-02", "b": "01ff", "l": [1, 2], "s": {"k": 3}, "m": {"x": 1}}]


def test_status_json_csv_and_parquet_give_the_funnel(run_dir, tmp_path):
    stages = {r["stage"]: r for r in json.loads(cli("status", str(run_dir), "--format", "json"))}
    assert stages["ingest"]["rows_in"] == N and stages["ingest"]["kept"] == N
    text_filter = stages["text_filter"]
    assert (text_filter["rows_in"], text_filter["kept"], text_filter["dropped"]) == (N, N - 30, 30)
    assert text_filter["dropped_by_reason"] == {"caption_too_short": 30}
    assert text_filter["failed_shards"] == 0 and text_filter["pending_shards"] == 0
    rows = list(csv.DictReader(io.StringIO(cli("status", str(run_dir), "--format", "csv"))))
    assert [r["stage"] for r in rows] == ["ingest", "text_filter"]
    assert json.loads(rows[1]["dropped_by_reason"]) == {"caption_too_short": 30} and rows[1]["kept"] == str(N - 30)
    cli("status", str(run_dir), "--format", "parquet", "--out", str(tmp_path / "s.parquet"))
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column("kept").to_pylist() == [N, N - 30]
    assert table.column("dropped_by_reason").to_pylist()[1] == [("caption_too_short", 30)]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pairsift.pipeline", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def demo_overrides(tmp_path: Path, input_path: Path) -> list[str]:
    """The demo preset, pointed at files that exist (its metadata is checked when the config loads)."""
    (tmp_path / "metadata.txt").write_text("red circle\n")
    return ["--set", f"input.path={input_path}", "--set", f"stages.balance.metadata={tmp_path / 'metadata.txt'}"]


def test_user_errors_are_one_line_and_exit_2(run_dir, tmp_path):
    parquet = run_cli("query", str(run_dir), "SELECT 1", "--format", "parquet", cwd=tmp_path)
    assert parquet.returncode == 2
    assert parquet.stderr == "error: --format parquet writes a file: give --out FILE.parquet\n"
    nowhere = run_cli("status", str(run_dir), "--format", "csv", "--out", str(tmp_path / "no" / "s.csv"), cwd=tmp_path)
    assert nowhere.returncode == 2 and nowhere.stderr.startswith("error: --out ") and nowhere.stderr.count("\n") == 1
    missing = run_cli("validate", "demo", *demo_overrides(tmp_path, tmp_path / "nope.parquet"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("error: input.path") and "no such file" in missing.stderr
    glob = run_cli("validate", "demo", *demo_overrides(tmp_path, tmp_path / "none-*.parquet"), cwd=tmp_path)
    assert glob.returncode == 2 and "no file matches" in glob.stderr


def test_validate_accepts_set_and_an_existing_input(run_dir, tmp_path):
    pool = run_dir.parent / "pool.parquet"
    sets = demo_overrides(tmp_path, pool)
    out = cli("validate", "demo", *sets, "--set", "stages.download.timeout_s=7")
    assert out.startswith("ok: 6 stages: text_filter, download, image_filter")
    bad = cli_result("validate", "demo", *sets, "--set", "stages.download.timeout_s=-1")
    assert bad.exit_code != 0 and "timeout_s" in str(bad.exception)  # the override reached the config
    bad = cli_result("validate", "demo", *sets, "--set", "nokey")
    assert bad.exit_code != 0 and "expected KEY=VALUE" in str(bad.exception)
