"""Crash consistency and no hang at the end, on a real local Ray.

Chaos: Ray worker processes running our tasks and actors are SIGKILLed at random points, and the
driver itself is SIGKILLed at a random point of the run; the rerun must then equal an uninterrupted
run: same catalog, byte-identical shard tars, no duplicated sample, no temporary file left, and
``verify_run`` clean. Stragglers: a shard that sleeps past ``executor.shard_timeout_s`` is cancelled,
retried, then recorded as failed, and the run ends within (shards x deadline) plus a little.
The longer version, with more seeds and the real download stage, is ``benchmarks/chaos.py``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_stages import (
    WorkerKiller,
    busy_workers,
    cli_argv,
    differences,
    duplicated_samples,
    finished_markers,
    our_raylet,
    run_until_killed,
    temp_files,
    wait_until_idle,
)

from pairsift.pipeline.config import parse_config
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.verify import verify_run

ROWS, SHARD_ROWS = 240, 60  # 4 input shards
MAX_RETRIES = 3
KILLS_PER_RUN = 2  # within the retries, so every kill must be survived by the run it hits


def make_pool(path: Path, n: int = ROWS) -> None:
    rows = [{"url": f"http://127.0.0.1:1/img/{i}.jpg", "caption": f"{'y' * (i % 29)} {i}"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def chaos_config(root: Path, pool: Path, kind: str = "ray", address: str | None = None) -> dict:
    """Per-shard tasks (render writes image tars), a pool stage in an actor pool, then the shard writer."""
    return {
        "run_dir": str(root / "run"),
        "input": {"path": str(pool), "shard_size": SHARD_ROWS},
        "executor": {"kind": kind, "max_retries": MAX_RETRIES, "shard_timeout_s": 120},
        "ray": {"address": address},
        "stages": [
            {"stage": "render", "sleep_s": 0.2},
            {"stage": "caption_length", "min_chars": 8, "sleep_s": 0.05},
            {"stage": "top_fraction", "fraction": 0.6},
        ],
        "shards": {"samples_per_shard": 50},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, registry):
    """The uninterrupted run everything else must equal (in-process: nothing to kill)."""
    root = tmp_path_factory.mktemp("reference")
    make_pool(root / "pool.parquet")
    summary = run_pipeline(parse_config(chaos_config(root, root / "pool.parquet", kind="local")))
    assert not summary.failed and summary.samples_written > 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_workers_and_driver_then_rerun_equal_an_uninterrupted_run(seed, reference, ray_local, tmp_path):
    rng = random.Random(seed)
    pool = tmp_path / "pool.parquet"
    pool.write_bytes((reference / "pool.parquet").read_bytes())
    address = ray_local.get_runtime_context().gcs_address
    cfg = chaos_config(tmp_path, pool, address=address)
    cfg_path = tmp_path / "chaos.json"
    cfg_path.write_text(json.dumps(cfg))
    run_root = tmp_path / "run"
    total = finished_markers(reference / "run")
    raylet = our_raylet()

    # 1. a separate driver on the session's Ray, workers killed under it, then the driver itself
    kill_driver_after = rng.randint(2, total - 2)
    with WorkerKiller(raylet, rng, budget=KILLS_PER_RUN) as killer:
        killed_driver = run_until_killed(cli_argv("run", str(cfg_path)), run_root, kill_driver_after,
                                         log=tmp_path / "driver.log")
    assert killed_driver, "the driver finished before the kill: the test did not test a crash"
    assert finished_markers(run_root) < total
    wait_until_idle(raylet)

    # 2. the same command again, in this process, with workers still being killed
    with WorkerKiller(raylet, rng, budget=KILLS_PER_RUN) as second:
        summary = run_pipeline(parse_config(cfg))
    assert not summary.failed, "every worker kill must be survived by a retry"
    assert len(killer.killed) + len(second.killed) >= 1, "no worker was killed: raise the sleeps"

    # 3. the result is the uninterrupted run's, byte for byte where bytes are deterministic
    assert differences(run_root, reference / "run", image_stages=("render",)) == []
    assert duplicated_samples(run_root) == 0
    assert temp_files(run_root) == []
    report = verify_run(run_root)
    assert report.ok, report.problems
    assert report.checked["samples"] == summary.samples_written > 0


def test_temp_files_of_a_killed_writer_are_swept_by_the_rerun(reference, tmp_path):
    """A writer killed mid-write leaves ``.NAME.XXXX.tmp`` beside its final name (never under it);
    rerunning the same command must leave the run as if that never happened."""
    pool = tmp_path / "pool.parquet"
    pool.write_bytes((reference / "pool.parquet").read_bytes())
    cfg = chaos_config(tmp_path, pool, kind="local")
    run_pipeline(parse_config(cfg))
    run = RunDir(tmp_path / "run")
    leftovers = [run.stage_dir("render") / ".00002.tar.pairsift-k1ll3d.tmp",
                 run.stage_dir("caption_length") / ".part-00004.parquet.pairsift-k1ll3d.tmp",
                 run.shards_dir / ".00001.tar.pairsift-k1ll3d.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (run.done_of(run.part("render", 2))).unlink()  # and its shard never finished
    summary = run_pipeline(parse_config(cfg))
    assert summary.stages[0].shards_done == 1
    assert temp_files(run.root) == []
    assert verify_run(run.root).ok
    assert differences(run.root, reference / "run", image_stages=("render",)) == []


@pytest.mark.parametrize("stage", ["slow_shard", "slow_shard_actor"])
def test_a_shard_past_its_deadline_is_retried_then_failed_and_the_run_ends(stage, ray_local, registry, tmp_path):
    n_shards, deadline_s = 3, 6.0  # the shard writer, a fresh Ray worker, must fit in it on a loaded machine
    rows = [{"url": f"http://127.0.0.1:1/{i}.jpg", "caption": f"caption number {i}"} for i in range(n_shards * 10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    cfg = parse_config({
        "run_dir": str(tmp_path / "run"),
        "input": {"path": str(tmp_path / "pool.parquet"), "shard_size": 10},
        "executor": {"kind": "ray", "max_retries": 1, "shard_timeout_s": deadline_s},
        "stages": [{"stage": stage, "slow_caption": "caption number 15", "slow_s": 600}],  # shard 1 hangs
        "shards": {"samples_per_shard": 100},
    })
    started = time.monotonic()
    summary = run_pipeline(cfg)
    elapsed = time.monotonic() - started
    assert elapsed < n_shards * deadline_s + 10, f"the run took {elapsed:.1f}s: something waited on the straggler"

    deadline_error = f"shard deadline of {deadline_s:g}s passed"
    assert list(summary.failed) == [stage] and list(summary.failed[stage]) == [1]
    run = RunDir(tmp_path / "run")
    meta = json.loads(run.run_json.read_text())
    assert meta["status"] == "failed_shards"
    assert list(meta["stage_runs"][0]["shards_failed"]) == ["1"]
    assert meta["stage_runs"][0]["shards_failed"]["1"].startswith(deadline_error)
    failed = run.read_failed(run.part(stage, 1))
    assert failed is not None and failed.attempts == 2  # one try, one retry
    assert failed.error.startswith(deadline_error)
    assert summary.stages[0].shards_done == n_shards - 1
    # the straggler was cancelled, not left sleeping in a worker
    deadline = time.monotonic() + 10
    while busy_workers(our_raylet()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert busy_workers(our_raylet()) == []
    # the rest of the run is whole; the one problem verify reports is the failed shard
    problems = verify_run(run.root).problems
    assert problems == [f"{stage} shard 1: failed: {failed.error}"]
