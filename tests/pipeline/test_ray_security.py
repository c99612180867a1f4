"""A local Ray is closed to every process without this run's token, and secrets never enter its tables.

The Ray is the session one, started by ``start_ray`` exactly as ``pairsift run`` starts it. Its
GCS listens on every interface, so an outsider dials it through 127.0.0.3 (tests/ray_outsider.py).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time

import pytest
from cluster_stages import cli_argv
from ray_outsider import (
    EVERY_INTERFACE,
    JOIN,
    KV_NAMESPACE,
    NO_TOKEN,
    READ_KV,
    WRONG_TOKEN,
    current_gcs_port,
    listeners,
    outsider,
    with_token,
)

from pairsift.common import ray_local
from pairsift.common.storage import storage_env
from pairsift.pipeline.catalog import funnel
from pairsift.pipeline.config import ExecutorConfig, RayConfig
from pairsift.pipeline.executor import Job, RayExecutor, WorkerSpec


@pytest.fixture(scope="module")
def gcs_port(ray_local):
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(b"probe", b"driver-wrote-this", namespace=KV_NAMESPACE.encode())
    return current_gcs_port()


def test_a_local_ray_runs_with_token_auth_and_a_fresh_random_token(ray_local):
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert len(os.environ["RAY_AUTH_TOKEN"]) == 64  # secrets.token_hex(32): 256 bits


@pytest.mark.parametrize("auth", [NO_TOKEN, WRONG_TOKEN], ids=["no-token", "wrong-token"])
def test_an_outsider_without_the_token_cannot_read_the_kv(gcs_port, auth):
    result = outsider(READ_KV, gcs_port, auth)
    assert result.returncode != 0 and "driver-wrote-this" not in result.stdout
    assert "auth" in result.stderr.lower(), result.stderr[-2000:]


def test_an_outsider_without_the_token_cannot_join_as_a_driver(gcs_port):
    result = outsider(JOIN, gcs_port, NO_TOKEN)
    assert result.returncode != 0 and "VALUE" not in result.stdout, result.stdout


def test_with_the_token_the_same_outsider_reads_the_kv_and_joins(gcs_port):
    token = with_token()
    read = outsider(READ_KV, gcs_port, token)
    assert "VALUE b'driver-wrote-this'" in read.stdout, read.stderr[-2000:]
    joined = outsider(JOIN, gcs_port, token)
    assert "VALUE token" in joined.stdout, joined.stderr[-2000:]  # the workers got the mode by inheritance


def test_what_listens_where_during_a_local_run(ray_local, gcs_port):
    """The README's table. The GCS, raylet and core workers listen on every interface (no Ray 2.60
    setting found binds them to loopback): token auth, checked above, is what closes them."""
    found = sorted(listeners())
    print("\n".join(f"{name:24} {ip:>10}:{port}" for name, _, ip, port in found))
    by_port = {port: name for name, _, _, port in found}
    assert by_port[gcs_port] == "gcs_server"
    assert {"gcs_server", "raylet"} <= {name for name, _, ip, _ in found if ip in EVERY_INTERFACE}
    assert all(ip in EVERY_INTERFACE or ip.startswith("127.") for _, _, ip, _ in found)


def env_reader() -> type:
    """A stage-like worker that returns a variable of its environment. Defined in a function so that
    Ray ships it by value: workers cannot import this test module."""

    class SeesEnv:
        def __init__(self, name: str):
            self.name = name

        def look(self, shard: int) -> str | None:
            return os.environ.get(self.name)

    return SeesEnv


def gcs_tables() -> bytes:
    """Everything a client of the cluster reads about actors, tasks and jobs, raw from the GCS."""
    import ray

    state = ray._private.state.state
    accessor = state._connect_and_get_accessor()
    actors = b"".join(accessor.get_actor_table(None, None))
    jobs = b"".join(accessor.get_job_table(skip_submission_job_info_field=False, skip_is_running_tasks_field=False))
    tasks = b"".join(event.SerializeToString() for event in state._get_all_task_events())
    return actors + jobs + tasks


def test_storage_secrets_never_enter_rays_tables(ray_local, monkeypatch):
    secret = secrets.token_hex(20)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    executor = RayExecutor(ExecutorConfig(max_retries=0), RayConfig())
    seen = []
    for stateful in (False, True):  # tasks and an actor pool
        executor.map(WorkerSpec(env_reader(), {"name": "AWS_ENDPOINT_URL"}, stateful=stateful),
                     [Job(shard, "look") for shard in range(2)], seen.append)
    assert [r.value for r in seen] == ["http://127.0.0.1:9"] * 4  # non-secret settings still travel
    time.sleep(2)  # task events reach the GCS within a second
    tables = gcs_tables()
    assert b"http://127.0.0.1:9" in tables  # the check reads the tables the endpoint went into
    assert secret.encode() not in tables


@pytest.fixture
def ray_untouched(monkeypatch):
    """Auth decisions only, in a private copy of the environment: the session Ray's mode, token and
    cached config must not change under it."""
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setattr(ray_local, "_refresh_imported_ray", lambda: None)
    return monkeypatch


def test_an_exported_disabled_mode_is_refused_for_a_local_ray(ray_untouched):
    monkeypatch = ray_untouched
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ray_local.RayAuthError, match="ray.auth_mode: disabled"):
        ray_local.prepare_local_auth(None)


def test_disabled_in_the_config_is_an_explicit_opt_out_with_a_warning(ray_untouched, capsys):
    monkeypatch = ray_untouched
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert ray_local.prepare_local_auth("disabled") == "disabled"
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ
    assert capsys.readouterr().err.startswith("warning: ray.auth_mode is disabled")


def test_a_config_contradicting_the_exported_mode_is_refused(ray_untouched):
    monkeypatch = ray_untouched
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ray_local.RayAuthError, match="make them agree"):
        ray_local.prepare_join_auth("disabled")


def test_joining_keeps_the_users_exported_token(ray_untouched):
    monkeypatch = ray_untouched
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "users-own-token")
    ray_local.prepare_join_auth(None)
    ray_local.prepare_local_auth("token")
    assert os.environ["RAY_AUTH_TOKEN"] == "users-own-token"


def cli_run(tmp_path, auth: dict[str, str]) -> subprocess.CompletedProcess:
    """``pairsift run`` of a small text-only pool on a Ray of its own, with ``auth`` exported: Ray tasks
    (the toy caption-length stage) and an actor pool (its top-fraction stage, stateful like download)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"url": f"http://127.0.0.1:1/{i}.jpg", "caption": f"a photo of thing number {i}"} for i in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    config = {"run_dir": str(tmp_path / "run"), "input": {"path": str(tmp_path / "pool.parquet"), "shard_size": 100},
              "executor": {"kind": "ray"}, "ray": {"num_cpus": 1},
              "stages": [{"stage": "caption_length", "min_chars": 5},
                         {"stage": "top_fraction", "fraction": 0.5}]}
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))} | auth
    return subprocess.run(cli_argv("run", str(tmp_path / "run.yaml")), env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_local_run_works_under_an_exported_token_mode(tmp_path):
    """Ray's documentation tells token users to export RAY_AUTH_MODE=token: a local run then starts
    its Ray with that mode and a fresh token (before: "Actor creation cancelled", exit 1)."""
    result = cli_run(tmp_path, {"RAY_AUTH_MODE": "token"})
    assert result.returncode == 0, result.stderr[-3000:]
    kept = {s.label: s.kept for s in funnel(tmp_path / "run")}
    # top half by caption length, ties kept: 100 captions of 27 chars, 90 of 26 (the threshold), 10 of 25
    assert (kept["caption_length"], kept["top_fraction"]) == (200, 190)


def test_a_local_run_under_an_exported_disabled_mode_is_refused_in_one_line(tmp_path):
    result = cli_run(tmp_path, {"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "set ray.auth_mode: disabled in the config" in errors[0]
    assert result.stderr.strip().endswith(errors[0])  # ingest's progress bars, then the one line


def test_only_non_secret_storage_settings_are_forwarded(monkeypatch):
    for name in [k for k in os.environ if k.startswith(("AWS_", "GOOGLE_", "GCS_", "AZURE_", "FSSPEC_"))]:
        monkeypatch.delenv(name)
    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                "AWS_SHARED_CREDENTIALS_FILE": "/etc/pairsift/aws", "GOOGLE_APPLICATION_CREDENTIALS": "/etc/gcs.json"}
    secret_settings = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
                "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=k", "AZURE_STORAGE_KEY": "k", "GCS_TOKEN": "t",
                "FSSPEC_S3_SECRET": "s", "AWS_ENDPOINT_URL_S3": "http://user:pass@127.0.0.1:9000"}
    for name, value in (settings | secret_settings).items():
        monkeypatch.setenv(name, value)
    assert storage_env() == settings
