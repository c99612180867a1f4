"""`pairsift run CONFIG --retry-failed`: re-fetch only the rows whose download failed, nothing else.

A real server on 127.0.0.1 (``flaky_server``) fails chosen paths (timeouts, 500s, dropped
connections, 503s) until the test heals them. Ground truth: the server's request log says exactly
which urls were asked again, and a run against the healed server from scratch says where a retry
must end (same download parts, same image tars, same training shards).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from flaky_server import FlakyServer

from pairsift.pipeline.catalog import funnel, query
from pairsift.pipeline.config import parse_config
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.run_dir import RunDir, shard_of
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.verify import verify_run
from pairsift.stages.download import TRANSIENT

REPO = Path(__file__).resolve().parents[2]
ROWS, SHARD_ROWS = 96, 24  # 4 input shards
SHORT = {i for i in range(ROWS) if i % 13 == 5}  # captions the text filter drops: never requested
# Shard 0 (rows 0-23) times out and fails; shard 2 (rows 48-71) fails and is rate limited;
# shards 1 and 3 never fail, so a retry must leave them alone.
FAILING = {3: "slow", 10: "slow", 7: "500", 12: "drop", 55: "500", 60: "drop", 50: "503", 66: "503"}
FIRST_REASONS = {"timeout": 2, "failed_to_download": 4, "rate_limited": 2}


def path_of(i: int) -> str:
    return f"/img/{i}.jpg"


def make_pool(root: Path, server: FlakyServer) -> Path:
    rows = [{"url": server.url(path_of(i)), "caption": "x" if i in SHORT else f"a photo of sample {i}"}
            for i in range(ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), root / "pool.parquet")
    return root / "pool.parquet"


def config(root: Path, pool: Path, kind: str = "local") -> dict:
    return {
        "run_dir": str(root / "run"),
        "input": {"path": str(pool), "shard_size": SHARD_ROWS},
        "executor": {"kind": kind, "max_retries": 0},
        "ray": {"node_ip": "127.0.0.2"},
        "stages": [
            {"stage": "text_filter", "min_chars": 5, "languages": None},
            {"stage": "download", "image_size": 32, "resize_mode": "keep_ratio", "timeout_s": 1.0,
             "deadline_s": 1.5, "thread_count": 8, "allow_loopback": True,
             "breaker": {"failures": None},  # one host serves every url: no circuit breaker
             "backoff": {"base_s": 0.01, "max_s": 0.02, "max_attempts": 1}},  # a 503 ends the row at once
            {"stage": "image_filter", "min_side": 24},  # every 7th image is 16x16
        ],
        "shards": {"samples_per_shard": 20},
    }


def markers(run: RunDir, label: str) -> dict[int, str]:
    return {shard_of(p): json.loads(p.read_text())["version"] for p in run.done_markers(label)}


def stage_funnel(root: Path) -> dict:
    return {s.label: s for s in funnel(root / "run")}


def requested_since(server: FlakyServer, start: int) -> list[str]:
    return sorted(server.requests[start:])


@pytest.fixture
def served(tmp_path):
    with FlakyServer({path_of(i): mode for i, mode in FAILING.items()}) as server:
        yield tmp_path, server, make_pool(tmp_path, server)


def first_run(root: Path, server: FlakyServer, pool: Path) -> RunDir:
    summary = run_pipeline(parse_config(config(root, pool)))
    assert not summary.failed
    assert stage_funnel(root)["download"].dropped == FIRST_REASONS
    alive = [i for i in range(ROWS) if i not in SHORT]
    assert sorted(server.requests) == sorted(path_of(i) for i in alive)  # each url asked once
    return RunDir(root / "run")


def test_retry_refetches_only_the_failed_rows_and_ends_where_a_clean_run_ends(served):
    root, server, pool = served
    run = first_run(root, server, pool)
    uids_before = query(root / "run", "SELECT uid FROM samples ORDER BY uid")[1]
    first = {label: markers(run, label) for label in ("download", "image_filter")}

    # still failing: the two 503 rows are asked again, fail again, and nothing after download is redone
    start = len(server.requests)
    summary = run_pipeline(parse_config(config(root, pool)), ["rate_limited"])
    assert requested_since(server, start) == sorted([path_of(50), path_of(66)])
    assert (summary.retries[0].rows_retried, summary.retries[0].rows_succeeded) == (2, 0)
    assert summary.stages[2].shards_done == 0  # image_filter: every shard's input is unchanged
    assert {label: markers(run, label) for label in first} == first
    assert stage_funnel(root)["download"].dropped == FIRST_REASONS
    server.heal()

    # --reasons timeout: only the two rows that timed out are asked again; only shard 0 changes
    start = len(server.requests)
    summary = run_pipeline(parse_config(config(root, pool)), ["timeout"])
    assert requested_since(server, start) == sorted([path_of(3), path_of(10)])
    assert stage_funnel(root)["download"].dropped == {"failed_to_download": 4, "rate_limited": 2}
    (retried,) = summary.retries
    assert (retried.rows_retried, retried.rows_succeeded, retried.shards_retried) == (2, 2, 1)
    after_timeout = {label: markers(run, label) for label in first}
    for label in first:
        assert after_timeout[label][0] != first[label][0]
        assert {s: after_timeout[label][s] for s in (1, 2, 3)} == {s: first[label][s] for s in (1, 2, 3)}

    # the default (transient) reasons, through the CLI: the six other failed rows, nothing else
    start = len(server.requests)
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config(root, pool)))
    cli = [sys.executable, "-m", "pairsift.pipeline"]
    result = subprocess.run(cli + ["run", str(cfg_path), "--retry-failed"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "download retry" in result.stdout and "6 rows in 2 shards re-fetched, 6 now downloaded" in result.stdout
    assert requested_since(server, start) == sorted(path_of(i) for i in (7, 12, 50, 55, 60, 66))
    status = subprocess.run(cli + ["status", str(root / "run")], capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0 and "failed_to_download" not in status.stdout and "timeout" not in status.stdout

    # the funnel: every row that reached download now has its image; the 16x16 ones among the
    # retried (row 7) now reach the image filter and are dropped there
    stages = stage_funnel(root)
    alive = [i for i in range(ROWS) if i not in SHORT]
    assert stages["download"].dropped == {} and stages["download"].kept == len(alive)
    assert stages["image_filter"].dropped == {"image_too_small": sum(i % 7 == 0 for i in alive)}
    assert all(s.balanced for s in stages.values())
    final = {label: markers(run, label) for label in first}
    for label in first:  # shards 0 and 2 changed in this pass, shards 1 and 3 never did
        assert final[label][0] != after_timeout[label][0] and final[label][2] != after_timeout[label][2]
        assert {s: final[label][s] for s in (1, 3)} == {s: first[label][s] for s in (1, 3)}

    # same samples, same uids, none twice; the run verifies from disk
    assert query(root / "run", "SELECT uid FROM samples ORDER BY uid")[1] == uids_before
    assert query(root / "run", "SELECT count(*) - count(DISTINCT uid) FROM samples")[1] == [(0,)]
    assert query(root / "run", "SELECT count(*) - count(DISTINCT uid) FROM shards")[1] == [(0,)]
    report = verify_run(root / "run")
    assert report.ok, report.problems
    log = [json.loads(line) for line in (root / "run/download/_markers/retries.jsonl").read_text().splitlines()]
    assert [(e["shard"], e["rows_retried"], e["succeeded"]) for e in log] == \
        [(2, 2, 0), (0, 2, 2), (0, 2, 2), (2, 4, 4)]
    assert [e["by_reason"] for e in log] == [
        {"rate_limited": [2, 0]}, {"timeout": [2, 2]}, {"failed_to_download": [2, 2]},
        {"failed_to_download": [2, 2], "rate_limited": [2, 2]}]
    assert log[0]["still_failing"] == {"rate_limited": 2} and log[0]["version_after"] == log[0]["version_before"]
    assert log[2]["version_before"] == log[1]["version_after"]
    assert json.loads((root / "run/run.json").read_text())["retries"][0]["rows_succeeded"] == 6

    # ground truth: a run from scratch against the healed server ends in the same place
    clean = root / "clean"
    clean.mkdir()
    run_pipeline(parse_config(config(clean, pool)))
    for shard in range(ROWS // SHARD_ROWS):
        assert pq.read_table(run.part("download", shard)).equals(
            pq.read_table(RunDir(clean / "run").part("download", shard)))
        assert run.images("download", shard).read_bytes() == RunDir(clean / "run").images("download", shard).read_bytes()
    sizes = (root / "run/shards/_meta/sizes.json").read_text()
    assert sizes == (clean / "run/shards/_meta/sizes.json").read_text()
    for name in json.loads(sizes):
        assert (root / "run/shards" / name).read_bytes() == (clean / "run/shards" / name).read_bytes()

    # nothing left to retry: a further retry asks for nothing and changes nothing
    start = len(server.requests)
    again = run_pipeline(parse_config(config(root, pool)), list(TRANSIENT))
    assert server.requests[start:] == [] and again.retries[0].shards_untouched == 4
    assert {label: markers(run, label) for label in first} == final


def test_retry_runs_on_ray_and_skips_taken_down_rows(served, ray_local):
    from pairsift.pipeline.maintenance import takedown

    root, server, pool = served
    run = first_run(root, server, pool)
    gone = server.url(path_of(55))  # failed the first time; taken down before the retry
    (root / "takedown.txt").write_text(gone + "\n")
    takedown(root / "run", root / "takedown.txt")
    server.heal()
    start = len(server.requests)
    summary = run_pipeline(parse_config(config(root, pool, kind="ray")), list(TRANSIENT))
    assert not summary.failed
    assert requested_since(server, start) == sorted(path_of(i) for i in FAILING if i != 55)
    assert summary.retries[0].rows_retried == 7 and summary.retries[0].rows_succeeded == 7
    assert stage_funnel(root)["download"].dropped == {"failed_to_download": 1}  # the taken-down row
    assert query(root / "run", f"SELECT count(*) FROM shards WHERE url = '{gone}'")[1] == [(0,)]
    assert markers(run, "download").keys() == {0, 1, 2, 3}
    report = verify_run(root / "run")
    assert report.ok, report.problems


def test_wrong_usage_is_one_line(tmp_path):
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/a.jpg"], "caption": ["a photo"]}), pool)
    cfg = config(tmp_path, pool)
    never = parse_config(cfg)
    with pytest.raises(UserError, match=r"has never run \(no run.json\)"):
        run_pipeline(never, list(TRANSIENT))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(UserError, match=r"unknown reason 'bogus'; retryable: timeout"):
        run_pipeline(never, ["timeout", "bogus"])
    with pytest.raises(UserError, match=r"opt_out is never retried: the site opted out"):
        run_pipeline(never, ["opt_out"])
    text_only = parse_config(cfg | {"stages": cfg["stages"][:1]})
    with pytest.raises(UserError, match=r"no stage of the config has retryable reasons \(stages: text_filter\)"):
        run_pipeline(text_only, list(TRANSIENT))
    # the CLI: exit 2, one line, no traceback
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "pairsift.pipeline", "run", str(cfg_path), "--retry-failed",
                             "--reasons", "timeout,nope"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --reasons: unknown reason 'nope'; retryable: timeout, dns_error, failed_to_download, "
        "domain_unavailable, rate_limited, decode_error, not_an_image, robots_disallowed"]


def test_changed_download_config_is_refused(served):
    root, server, pool = served
    first_run(root, server, pool)
    changed = config(root, pool)
    changed["stages"][1]["image_size"] = 48
    with pytest.raises(UserError, match=r"the config of download \(or of a stage before it\) changed"):
        run_pipeline(parse_config(changed), list(TRANSIENT))


def test_a_retry_that_fails_midway_leaves_the_shard_to_be_redone_whole(served):
    root, server, pool = served
    run = first_run(root, server, pool)
    run.images("download", 2).write_bytes(b"not a tar")  # damaged: the retry of shard 2 fails mid-replace
    server.heal()
    cfg = config(root, pool)
    cfg["executor"]["max_retries"] = 1  # the second attempt finds the marker gone and must not pass as done
    summary = run_pipeline(parse_config(cfg), list(TRANSIENT))
    assert list(summary.failed["download"]) == [2]
    # (output shards whose slices read the damaged tar fail too: loudly, and the rerun rewrites them)
    assert set(summary.failed) <= {"download", "shards"}
    assert "ReadError" in summary.failed["download"][2]  # the cause, not the second attempt's echo
    assert run.read_done(run.part("download", 2)) is None and run.read_failed(run.part("download", 2))
    assert summary.retries[0].shards_retried == 1  # shard 0 went through
    assert json.loads((root / "run/run.json").read_text())["status"] == "failed_shards"

    start = len(server.requests)
    repaired = run_pipeline(parse_config(config(root, pool)))  # a plain rerun redoes shard 2 whole
    assert not repaired.failed
    shard_2 = [i for i in range(48, 72) if i not in SHORT]
    assert requested_since(server, start) == sorted(path_of(i) for i in shard_2)
    assert stage_funnel(root)["download"].dropped == {}
    report = verify_run(root / "run")
    assert report.ok, report.problems
