"""Input lists, run directories and shards on object storage: a real S3 API (moto's server) on 127.0.0.1.

The same spine config runs once into a local directory and once with its URL list and run directory
in a bucket; the catalog, the funnel and the shards must be the same, and every command that reads
a run (status, query, verify, subset, takedown, report) must work on the bucket as on disk.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pairsift.common.storage import as_path
from pairsift.pipeline.catalog import funnel, query
from pairsift.pipeline.cli import app
from pairsift.pipeline.config import CONFIGS_DIR, parse_config
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.maintenance import subset, takedown
from pairsift.pipeline.report import write_report
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.synth import synthesize
from pairsift.pipeline.verify import verify_run

POOL = 240
BUCKET = "pairsift-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on loopback, and the AWS variables that point every client at it (set before
    anything reads them; the executor forwards these non-secret ones to the Ray workers)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    credentials = tmp_path_factory.mktemp("aws") / "credentials"  # keys by file: env keys stay out of Ray
    credentials.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test\n")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service for credentials
        }.items():
            env.setenv(name, value)
        try:
            _wait_for(port)
            import s3fs

            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)


def _wait_for(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def spine(run_dir: str, urls: str, executor: str):
    data = yaml.safe_load((CONFIGS_DIR / "demo.yaml").read_text())
    data["stages"] = [s for s in data["stages"] if s["stage"] in ("text_filter", "download", "image_filter")]
    next(s for s in data["stages"] if s["stage"] == "download")["allow_loopback"] = True  # as `demo` sets it
    data.update(run_dir=run_dir, shards={"samples_per_shard": 50}, executor={"kind": executor})
    data["input"].update(path=urls, shard_size=80)
    return parse_config(data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_endpoint, ray_local):
    """The same pool curated on disk (local executor) and in the bucket (Ray executor)."""
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    synthesize(root / "corpus", n=POOL, seed=11, base_url=f"http://127.0.0.1:{port}")
    remote_urls = f"s3://{BUCKET}/lists/urls.parquet"
    as_path(remote_urls).write_bytes((root / "corpus/urls.parquet").read_bytes())
    remote_run = f"s3://{BUCKET}/runs/spine"
    with serve(root / "corpus", port=port):
        local = run_pipeline(spine(str(root / "run"), str(root / "corpus/urls.parquet"), "local"))
        remote = run_pipeline(spine(remote_run, remote_urls, "ray"))
        again = run_pipeline(spine(remote_run, remote_urls, "ray"))
    return root, remote_run, local, remote, again


def shard_samples(run_dir) -> dict[str, dict[str, bytes]]:
    """Every member of every training shard, by shard name, read through the run's own filesystem."""
    shards = RunDir(run_dir).shards_dir
    out = {}
    for tar_path in sorted(shards.glob("[0-9]*.tar"), key=lambda p: p.name):
        with tar_path.open("rb") as handle, tarfile.open(fileobj=io.BytesIO(handle.read())) as tar:
            out[tar_path.name] = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return out


def test_a_run_in_a_bucket_equals_the_same_run_on_disk(runs):
    root, remote_run, local, remote, _ = runs
    assert not local.failed and not remote.failed
    assert remote.samples_written == local.samples_written > 0
    sql = "SELECT uid, dropped_at, reason FROM samples ORDER BY uid"
    assert query(remote_run, sql) == query(root / "run", sql)
    assert [(f.label, f.rows_in, f.kept, f.dropped) for f in funnel(remote_run)] == \
           [(f.label, f.rows_in, f.kept, f.dropped) for f in funnel(root / "run")]
    assert shard_samples(remote_run) == shard_samples(root / "run")  # byte for byte
    report = verify_run(remote_run)
    assert report.ok, report.problems
    sizes = as_path(f"{remote_run}/shards/_meta/sizes.json").read_text()
    assert sizes == (root / "run/shards/_meta/sizes.json").read_text()


def test_a_rerun_in_a_bucket_resumes_and_does_nothing(runs):
    *_, remote, again = runs
    assert [r.shards_done for r in again.stages] == [0] * len(again.stages)
    assert sum(r.shards_skipped for r in again.stages) == sum(r.shards_done for r in remote.stages)
    assert again.samples_written == remote.samples_written


def test_nothing_temporary_is_left_in_the_bucket(runs):
    _, remote_run, *_ = runs
    names = [p.name for p in as_path(remote_run).rglob("*")]
    assert names and not [n for n in names if n.endswith(".tmp")]


def test_commands_read_and_maintain_a_run_in_a_bucket(runs, tmp_path):
    root, remote_run, *_ = runs
    cli = CliRunner()
    status = cli.invoke(app, ["status", remote_run])
    assert status.exit_code == 0 and "image_filter" in status.output
    asked = cli.invoke(app, ["query", remote_run, "SELECT count(*) AS n FROM samples"])
    assert asked.exit_code == 0 and str(POOL) in asked.output
    assert cli.invoke(app, ["verify", remote_run]).exit_code == 0
    assert as_path(str(write_report(remote_run))).exists()

    # subset: from the bucket into the bucket, streaming, half of the samples by uid
    kept = pq.read_table(io.BytesIO(as_path(f"{remote_run}/shards/_meta/00000.parquet").read_bytes()))
    chosen = kept.column("uid").to_pylist()[::2]
    (tmp_path / "uids.txt").write_text("\n".join(chosen) + "\n")
    out = f"s3://{BUCKET}/subsets/half"
    result = subset(remote_run, tmp_path / "uids.txt", None, False, out)
    assert result.samples_out == len(chosen) and result.not_found == 0
    got = [n.split(".")[0] for members in shard_samples_in(out).values() for n in members if n.endswith(".txt")]
    assert got == chosen

    # takedown in place: the listed urls leave the shards and the catalog, and the run still verifies
    urls = kept.column("url").to_pylist()[:3]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    done = takedown(remote_run, tmp_path / "urls.txt")
    assert done.samples_removed == 3
    _, rows = query(remote_run, "SELECT url FROM samples WHERE reason = 'takedown'")
    assert sorted(r[0] for r in rows) == sorted(urls)
    assert not {u for shard in shard_samples(remote_run).values() for u in shard} & {f"{k}.txt" for k in
                                                                                   kept.column("uid").to_pylist()[:3]}
    assert verify_run(remote_run).ok
    assert len(as_path(f"{remote_run}/takedowns.jsonl").read_text().splitlines()) == 3


def shard_samples_in(shards_dir: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for tar_path in sorted(as_path(shards_dir).glob("[0-9]*.tar"), key=lambda p: p.name):
        with tarfile.open(fileobj=io.BytesIO(tar_path.read_bytes())) as tar:
            out[tar_path.name] = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return out


def test_bad_remote_locations_fail_with_one_line(s3_endpoint, tmp_path):
    with pytest.raises(UserError, match="no-such-bucket"):
        RunDir("s3://no-such-bucket/run").create()
    with pytest.raises(UserError, match="nosuchfs://x/run"):
        RunDir("nosuchfs://x/run")
    result = CliRunner().invoke(app, ["status", f"s3://{BUCKET}/never-ran"])  # main() prints UserErrors in one line
    assert isinstance(result.exception, UserError) and "not a pairsift run directory" in str(result.exception)


def test_ingest_reads_a_gzipped_jsonl_list_from_a_bucket(s3_endpoint, tmp_path):
    import gzip
    import json

    from pairsift.stages.ingest import iter_input_shards

    rows = [{"url": f"http://127.0.0.1/{i}.jpg", "caption": f"a photo number {i}"} for i in range(25)]
    path = f"s3://{BUCKET}/lists/small.jsonl.gz"
    as_path(path).write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    shards = list(iter_input_shards(path, shard_size=10))
    assert [s.num_rows for s in shards] == [10, 10, 5]
    assert sum((s.column("url").to_pylist() for s in shards), []) == [r["url"] for r in rows]


def test_local_paths_stay_plain_paths(tmp_path):
    assert isinstance(as_path(str(tmp_path)), Path)
    assert as_path(f"file://{tmp_path}") == tmp_path


def test_a_config_can_live_in_a_bucket(s3_endpoint):
    from pairsift.pipeline.config import load_config

    local = spine(f"s3://{BUCKET}/runs/from-config", f"s3://{BUCKET}/lists/urls.parquet", "ray")
    as_path(f"s3://{BUCKET}/configs/job.yaml").write_text(yaml.safe_dump(local.to_json()))
    assert load_config(f"s3://{BUCKET}/configs/job.yaml") == local
    with pytest.raises(UserError, match="not found"):
        load_config(f"s3://{BUCKET}/configs/missing.yaml")
