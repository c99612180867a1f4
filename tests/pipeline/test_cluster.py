"""A real multi-node Ray cluster on one machine: a head on 127.0.0.2, workers on 127.0.0.3 and .4.

Each node is its own ``ray start`` with its own temp dir, ports and custom resource, with token auth on
every process and one token, as a cluster operator must set it up. The demo's download path, submitted
with ``ray job submit``, must give exactly what a local run gives; Ray's own task records (its state
API) show that both worker nodes did work. Then a driver joins by ``--address`` and a worker node is
killed mid-run (its raylet and workers, by pid) while a ``trace`` stage records where each shard runs:
the run ends on the other nodes with every shard exactly once, equal to a local run. Only the processes
these tests start are stopped, by id (``ray stop`` would end every Ray on the machine), and the module
checks that none is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_stages import (
    cli_argv,
    differences,
    duplicated_samples,
    kill_all,
    living,
    matching,
    process_table,
    read_trace,
    temp_files,
)

from pairsift.common import ray_local
from pairsift.pipeline.config import load_config, parse_config
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import serve
from pairsift.pipeline.synth import synthesize
from pairsift.pipeline.verify import verify_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP = "127.0.0.2"
WORKERS = {"w1": "127.0.0.3", "w2": "127.0.0.4"}


def free_port() -> int:
    """A port free on every address: Ray's GCS and raylets listen on all of them."""
    return ray_local.free_port("0.0.0.0")


class LocalCluster:
    """``ray start`` head + workers, each node's processes found by its temp dir and parent tree."""

    def __init__(self, root: Path):
        self.root = root  # short: Ray's unix socket paths live under it
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.dashboard = f"http://{HEAD_IP}:{self.dashboard_port}"
        self.seen: set[int] = set()  # every pid ever found belonging to this cluster

    def env(self, label: str = "driver") -> dict[str, str]:
        return os.environ | {
            # Token auth on every process of every node, as a cluster operator must set it up
            # (ray_local exported mode and token into this process's environment before the start).
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"],
            "RAY_USAGE_STATS_ENABLED": "0",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),  # workers import the test stages
            "PAIRSIFT_NODE": label,
            # declare a lost node dead in about 2 s instead of Ray's default ~30 s
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "3",
        }

    def node_marker(self, label: str) -> str:
        return f"{self.root}/{label}/"

    def pids(self, label: str | None = None) -> set[int]:
        found = matching(self.node_marker(label) if label else f"{self.root}/")
        self.seen |= found
        return found

    def _start(self, label: str, args: list[str]) -> subprocess.Popen:
        (self.root / label).mkdir(parents=True, exist_ok=True)
        argv = [RAY, "start", *args, f"--temp-dir={self.root / label}", "--num-cpus=1",
                f"--resources={json.dumps({label: 1})}", "--object-store-memory=100000000",
                f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        return subprocess.Popen(argv, env=self.env(label), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def start(self) -> None:
        head = self._start("head", ["--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                                    "--include-dashboard=True", f"--dashboard-host={HEAD_IP}",
                                    f"--dashboard-port={self.dashboard_port}",
                                    f"--ray-client-server-port={free_port()}"])
        self._check(head, "head")
        workers = {label: self._start(label, [f"--address={self.address}", f"--node-ip-address={ip}"])
                   for label, ip in WORKERS.items()}
        for label, proc in workers.items():
            self._check(proc, label)

    def _check(self, proc: subprocess.Popen, label: str) -> None:
        out, _ = proc.communicate(timeout=120)
        self.pids(label)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start for {label} failed:\n{out[-3000:]}")

    def kill_node(self, label: str) -> set[int]:
        """A node crash: SIGKILL its raylet, workers and agents at once, no goodbye to the head."""
        pids = self.pids(label)
        kill_all(pids, crash=True)
        return pids

    def stop(self) -> set[int]:
        """Stop every process of this cluster, workers first, by id; return any still running."""
        for label in [*WORKERS, "head"]:
            kill_all(self.pids(label))
        kill_all(self.pids())  # anything that appeared meanwhile
        return living(self.seen | self.pids())


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="psc-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        # this process reads the head's state API too: the same mode and token as the nodes (and as
        # a session Ray this process may already have started)
        ray_local.prepare_local_auth(None)
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        table = process_table()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left behind: {[(p, table.get(p, (0, '', ''))[2][:80]) for p in left]}"


def trace_by_shard(trace_dir: Path) -> dict[str, list[dict]]:
    shards: dict[str, list[dict]] = {}
    for line in sorted(read_trace(trace_dir), key=lambda t: t["time"]):
        shards.setdefault(line["first_uid"], []).append(line)
    return shards


# --- the demo's download path on the cluster, as a Ray job ------------------------------------

def download_config(root: Path, corpus: Path, name: str) -> Path:
    cfg = {
        "run_dir": str(root / name / "run"),
        "input": {"path": str(corpus / "urls.parquet"), "shard_size": 40},
        "executor": {"kind": "ray", "max_retries": 2, "shard_timeout_s": 120},
        "stages": [
            {"stage": "text_filter", "min_chars": 5, "min_words": 2, "languages": ["en"], "dedup": "url"},
            {"stage": "download", "image_size": 32, "resize_mode": "keep_ratio", "encode_format": "jpg",
             "timeout_s": 5, "deadline_s": 10, "thread_count": 8, "allow_loopback": True},
            {"stage": "image_filter", "min_side": 24, "max_aspect_ratio": 3.0},
        ],
        "shards": {"samples_per_shard": 50},
    }
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small synthetic web served on 127.0.0.1, and the local run every cluster run must equal."""
    root = tmp_path_factory.mktemp("cluster-web")
    port = ray_local.free_port()
    synthesize(root / "corpus", n=160, seed=11, base_url=f"http://127.0.0.1:{port}", seed_size=0,
               test_per_concept=0, workers=1)
    with serve(root / "corpus", port=port):
        local = load_config(str(download_config(root, root / "corpus", "local")), {"executor.kind": "local"})
        assert not run_pipeline(local).failed
        yield root


def nodes_by_job(cluster: LocalCluster) -> dict[str, set[str]]:
    """Ray's own record (its state API, on the head's dashboard) of where the executor's tasks ran:
    driver job id -> node addresses."""
    from ray.util.state import list_nodes, list_tasks

    ips = {node.node_id: node.node_ip for node in list_nodes(address=cluster.dashboard)}
    jobs: dict[str, set[str]] = {}
    for task in list_tasks(address=cluster.dashboard, filters=[("name", "=", "_call_worker")], detail=True,
                           limit=10_000, raise_on_missing_output=False):
        jobs.setdefault(task.job_id, set()).add(ips.get(task.node_id, "?"))
    return jobs


def new_job_nodes(cluster: LocalCluster, before: dict[str, set[str]]) -> set[str]:
    """The nodes the one driver started since ``before`` ran tasks on (task events reach the head
    within a second or two)."""
    deadline = time.monotonic() + 20
    while True:
        new = {job: nodes for job, nodes in nodes_by_job(cluster).items() if job not in before}
        if (len(new) == 1 and set(WORKERS.values()) <= next(iter(new.values()))) or time.monotonic() > deadline:
            assert len(new) == 1, f"expected one new driver job, found {new}"
            return next(iter(new.values()))
        time.sleep(0.5)


def test_the_pipeline_submitted_as_a_ray_job_on_three_nodes_equals_a_local_run(cluster, corpus):
    """No --address: the job's RAY_ADDRESS says where. No working dir is uploaded (the venv has
    pairsift installed; workers get PYTHONPATH and the auth token from their node: no secret in the
    runtime env). Joining by --address is the
    node-loss test's driver."""
    root = corpus
    before = nodes_by_job(cluster)
    job = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard,
         "--runtime-env-json", json.dumps({"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}),
         "--", sys.executable, "-m", "pairsift.pipeline", "run", str(download_config(root, root / "corpus", "job"))],
        env=cluster.env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    nodes = new_job_nodes(cluster, before)

    run = root / "job" / "run"
    assert differences(run, root / "local" / "run", image_stages=("download",)) == []
    assert duplicated_samples(run) == 0
    report = verify_run(run)
    assert report.ok, report.problems
    assert report.checked["samples"] > 0
    # the work really was spread: Ray ran shards on both worker nodes, not only on the head
    assert set(WORKERS.values()) <= nodes, nodes


# --- losing a node mid-run ---------------------------------------------------------------------

def node_loss_config(root: Path, sleep_s: float, kind: str = "ray") -> dict:
    return {
        "run_dir": str(root / "run"),
        "input": {"path": str(root.parent / "pool.parquet"), "shard_size": 30},
        "executor": {"kind": kind, "max_retries": 2, "shard_timeout_s": 120},
        "stages": [
            {"stage": "render"},
            {"stage": "trace", "trace_dir": str(root / "trace"), "sleep_s": sleep_s},
            {"stage": "caption_length", "min_chars": 6},
            {"stage": "top_fraction", "fraction": 0.5},  # an actor pool, on whatever nodes are left
        ],
        "shards": {"samples_per_shard": 40},
    }


def test_a_worker_node_lost_mid_run_and_the_run_completes_on_the_rest_once(cluster, registry, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_shards = 6
    rows = [{"url": f"http://127.0.0.1:1/{i}.png", "caption": f"{'z' * (i % 11)} row {i}"} for i in range(30 * n_shards)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    (tmp_path / "local").mkdir()
    assert not run_pipeline(parse_config(node_loss_config(tmp_path / "local", sleep_s=0, kind="local"))).failed

    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(json.dumps(node_loss_config(tmp_path / "cluster", sleep_s=1.5)))
    trace_dir = tmp_path / "cluster" / "trace"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(cli_argv("run", str(cfg_path), "--address", cluster.address), env=cluster.env(),
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not any(t["node"] == "w2" and t["event"] == "start" for t in read_trace(trace_dir)):
            assert driver.poll() is None and time.monotonic() < deadline, "no shard ever started on w2"
            time.sleep(0.05)
        killed_at = time.time()
        killed = cluster.kill_node("w2")
        assert killed and not living(killed)
        assert driver.wait(timeout=240) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    run = tmp_path / "cluster" / "run"
    # the shard that was running on w2 never finished there and was redone on a surviving node
    shards = trace_by_shard(trace_dir)
    assert len(shards) == n_shards
    lost = [uid for uid, lines in shards.items()
            if any(t["node"] == "w2" and t["event"] == "start" for t in lines)
            and not any(t["node"] == "w2" and t["event"] == "end" for t in lines)]
    assert lost, "the kill should have caught a shard running on w2"
    for uid in lost:
        assert any(t["event"] == "end" and t["node"] in ("head", "w1") for t in shards[uid])
    assert all(t["node"] != "w2" for t in read_trace(trace_dir) if t["time"] > killed_at + 1)
    # every shard exactly once, and the same result as a local run
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished"
    assert all(not r["shards_failed"] and not r["shards_blocked"] for r in meta["stage_runs"])
    assert [r["rows"] for r in meta["stage_runs"][:3]] == [len(rows)] * 3  # each stage saw every row once
    assert differences(run, tmp_path / "local" / "run", image_stages=("render",)) == []
    assert duplicated_samples(run) == 0
    assert temp_files(run) == []
    report = verify_run(run)
    assert report.ok, report.problems
