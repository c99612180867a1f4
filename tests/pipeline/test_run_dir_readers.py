"""The run directory as standard tools read it: Ray Data and DuckDB see exactly a stage's rows, and
``read_webdataset`` exactly the training samples; where every file sits; file modes; the run
directory's name and its stage labels never reach SQL or a glob as anything but a literal."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairsift.pipeline.catalog import funnel, query
from pairsift.pipeline.config import parse_config
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.verify import verify_run

LABELS = ["ingest", "render", "caption_length", "top_fraction"]


def make_pool(path: Path, n: int) -> None:
    rows = [{"url": f"http://127.0.0.1:1/img/{i}.jpg", "caption": f"{'y' * (i % 29)} {i}"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def config(run_dir: Path, pool: Path, image_stage: bool = True) -> dict:
    """An image stage (render writes tars), a per-shard stage, a pool stage, then the shard writer."""
    stages = [{"stage": "render"}] if image_stage else []
    stages += [{"stage": "caption_length", "min_chars": 8}, {"stage": "top_fraction", "fraction": 0.6}]
    return {"run_dir": str(run_dir), "input": {"path": str(pool), "shard_size": 60},
            "executor": {"kind": "local"}, "stages": stages, "shards": {"samples_per_shard": 50}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, registry) -> Path:
    root = tmp_path_factory.mktemp("readers")
    make_pool(root / "pool.parquet", 240)
    summary = run_pipeline(parse_config(config(root / "run", root / "pool.parquet")))
    assert not summary.failed and summary.samples_written > 0
    return root / "run"


def catalog_count(run_dir: Path, view: str) -> int:
    return query(run_dir, f'SELECT count(*) FROM "{view}"')[1][0][0]


def test_the_layout_keeps_everything_private_under_underscore_names(finished):
    def names(folder: str) -> set[str]:
        return {p.name for p in (finished / folder).iterdir()}

    parts = {f"part-{i:05d}.parquet" for i in range(4)}
    tars = {f"{i:05d}.tar" for i in range(4)}
    done = {f"part-{i:05d}.done.json" for i in range(4)}
    assert names("") == {"run.json", "shards", *LABELS}
    assert names("ingest") == parts | {"_manifest.json", "_markers"}
    assert names("render") == parts | tars | {"_markers"}
    assert names("caption_length") == parts | {"_markers"}
    assert names("top_fraction") == parts | {"_markers", "_pool"}
    assert names("top_fraction/_pool") == {f"partial-{i:05d}.parquet" for i in range(4)} | {"fit.json",
                                                                                            "fit-lengths.parquet"}
    assert names("top_fraction/_markers") == done | {f"partial-{i:05d}.done.json" for i in range(4)}
    for label in LABELS[:-1]:
        assert names(f"{label}/_markers") == done
    sizes = json.loads((finished / "shards/_meta/sizes.json").read_text())
    shard_tars = set(sizes)
    assert names("shards") == shard_tars | {"__len__", "_meta", "_markers"}
    assert names("shards/_meta") == {n.replace(".tar", ".parquet") for n in shard_tars} | {"sizes.json"}
    assert names("shards/_markers") == {n.replace(".tar", ".done.json") for n in shard_tars}
    assert int((finished / "shards/__len__").read_text()) == sum(sizes.values())
    assert verify_run(finished).ok


def test_ray_data_and_duckdb_read_exactly_the_catalogs_rows(finished, ray_local):
    ray = ray_local
    for label in LABELS:
        expected = catalog_count(finished, label)
        folder = str(finished / label)
        assert ray.data.read_parquet(folder).count() == expected, label
        (duck,) = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet', "
                                           "union_by_name=true)").fetchone()
        assert duck == expected, label
    samples = ray.data.read_webdataset(str(finished / "shards")).take_all()
    shard_uids = query(finished, "SELECT uid FROM shards")[1]
    assert sorted(s["__key__"] for s in samples) == sorted(u for (u,) in shard_uids)
    kept = query(finished, "SELECT count(*) FROM samples WHERE reason IS NULL")[1][0][0]
    assert len(samples) == kept == int((finished / "shards/__len__").read_text())


def test_the_funnel_is_unbalanced_when_a_stage_lost_a_row(finished, tmp_path):
    assert all(stage.balanced for stage in funnel(finished))
    damaged = tmp_path / "run"
    shutil.copytree(finished, damaged)
    part = RunDir(damaged).part("caption_length", 1)
    table = pq.read_table(part)
    pq.write_table(table.slice(1), part)  # a row removed by hand

    stages = {s.label: s for s in funnel(damaged)}
    assert not stages["caption_length"].balanced
    assert stages["caption_length"].rows_in == 240  # what render kept, not what the parts add up to
    assert stages["render"].balanced and stages["ingest"].balanced


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_gets_the_mode_the_umask_gives(umask, tmp_path, registry):
    make_pool(tmp_path / "pool.parquet", 120)
    previous = os.umask(umask)
    try:
        run_pipeline(parse_config(config(tmp_path / "run", tmp_path / "pool.parquet")))
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 30
    modes = {p.relative_to(tmp_path): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def crafted_run(tmp_path: Path, finished: Path, label: str) -> Path:
    """A copy of a finished run whose run.json names a stage label meant to break out of SQL, with
    the stage's folder renamed to match where a file system allows it (so the label would be used)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["stages"][1]["label"] == "caption_length"
    meta["config"]["stages"][1]["label"] = label
    (run / "run.json").write_text(json.dumps(meta))
    if "/" not in label:
        (run / "caption_length").rename(run / label)
    return run


@pytest.mark.parametrize("label", ["x\"); COPY (SELECT 1) TO 'PWNED' (FORMAT csv); --",
                                   "x'); COPY (SELECT 1) TO 'PWNED' (FORMAT csv); --", "../caption_length"])
def test_a_crafted_label_in_run_json_is_refused_and_writes_nothing(finished, tmp_path, label):
    run = crafted_run(tmp_path, finished, label)
    for args in (["status", str(run)], ["query", str(run), "SELECT count(*) FROM samples"]):
        result = subprocess.run([sys.executable, "-m", "pairsift.pipeline", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: stage label") and len(result.stderr.splitlines()) == 1
    assert not list(tmp_path.rglob("PWNED*"))
    with pytest.raises(UserError, match="stage label"):
        query(run, "SELECT 1")


def test_a_label_that_is_a_path_or_has_a_quote_is_refused_at_config_load(tmp_path):
    for label in ["../x", "/abs", "it's", ".hidden", "a/b"]:
        cfg = config(tmp_path / "run", tmp_path / "pool.parquet", image_stage=False)
        cfg["stages"][0]["label"] = label
        with pytest.raises(UserError, match=re.escape(repr(label))):
            parse_config(cfg)


def test_run_dirs_with_glob_characters_read_only_their_own_files(tmp_path, registry):
    """``r[v2]`` as a glob matches ``rv`` and ``r2``; ``run-*`` matches ``run-a``: none may leak in."""
    rows = {"r[v2]": 60, "rv": 120, "r2": 180, "run-*": 240, "run-a": 300}
    for name, n in rows.items():
        make_pool(tmp_path / f"{name}.parquet", n)
        run_pipeline(parse_config(config(tmp_path / name, tmp_path / f"{name}.parquet", image_stage=False)))
    for name, n in rows.items():
        assert catalog_count(tmp_path / name, "samples") == n, name
        assert catalog_count(tmp_path / name, "caption_length") == n, name  # every row reaches it
        stages = funnel(tmp_path / name)
        assert stages[0].rows_in == n and all(stage.balanced for stage in stages), name


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    make_pool(tmp_path / "pool.parquet", 60)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    (home / ".draft.tmp").write_text("an editor's temporary")
    with pytest.raises(UserError, match="not empty and is not a pairsift run"):
        run_pipeline(parse_config(config(home, tmp_path / "pool.parquet", image_stage=False)))
    assert sorted(p.name for p in home.iterdir()) == [".draft.tmp", "notes.txt"]


def test_the_sweep_removes_only_pairsifts_own_temporaries(tmp_path, registry):
    make_pool(tmp_path / "pool.parquet", 60)
    cfg = parse_config(config(tmp_path / "run", tmp_path / "pool.parquet", image_stage=False))
    run_pipeline(cfg)
    run = RunDir(tmp_path / "run")
    ours = [run.stage_dir("caption_length") / ".part-00000.parquet.pairsift-k1ll3d.tmp",
            run.shards_dir / "_meta" / ".sizes.json.pairsift-k1ll3d.tmp"]
    foreign = [run.root / ".notes.tmp", run.stage_dir("caption_length") / ".part-00000.parquet.other.tmp"]
    for path in ours + foreign:
        path.write_bytes(b"half a file")
    run_pipeline(cfg)
    assert [p.exists() for p in ours + foreign] == [False, False, True, True]


def test_open_clip_counts_the_samples_from_len(finished):
    from open_clip_train.data import get_dataset_size

    sizes = json.loads((finished / "shards/_meta/sizes.json").read_text())
    every = str(finished / "shards" / f"{{00000..{len(sizes) - 1:05d}}}.tar")
    assert get_dataset_size(every) == (sum(sizes.values()), len(sizes))
