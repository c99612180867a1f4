"""Executors: run jobs (one shard each) on workers, retrying, timing out and recording failures.

A worker is any class built from ``WorkerSpec`` whose methods the jobs name (``ShardRunner`` for
stages, ``ShardWriter`` for the final shards). ``LocalExecutor`` runs them in this process, which is
what unit tests and debugging want; ``RayExecutor`` runs them as Ray tasks (cheap setup) or as a pool
of actors (expensive setup, GPUs), with each job's resources declared, a deadline per shard, and a
replacement worker when one dies. Both yield the same ``JobResult``s, so the runner cannot tell them
apart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pairsift.common import ray_local
from pairsift.common.storage import storage_env
from pairsift.pipeline.config import ExecutorConfig, RayConfig
from pairsift.pipeline.errors import UserError
from pairsift.stages.base import Resources


@dataclass(frozen=True)
class WorkerSpec:
    cls: type
    kwargs: dict[str, Any]
    resources: Resources = Resources()
    stateful: bool = False  # keep workers alive across shards (actor pool) instead of one task each


@dataclass
class Job:
    shard: int
    method: str
    args: tuple = ()
    attempts: int = 0


@dataclass
class JobResult:
    job: Job
    value: Any = None
    error: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def _one_line(exc: BaseException) -> str:
    """The error a shard failed with, in one line: usually the message's last line, but for a
    config that fails validation on a worker, the field and what is wrong with it (pydantic's last
    line is only a link to its documentation)."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or exc.title
        return f"{type(exc).__name__}: {exc.title}.{where}: {first['msg']}"[:500]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"[:500]


class LocalExecutor:
    def __init__(self, cfg: ExecutorConfig):
        self.cfg = cfg

    def map(self, spec: WorkerSpec, jobs: list[Job], on_result: Callable[[JobResult], None]) -> None:
        worker = None
        for job in jobs:
            errors: list[str] = []
            while True:
                job.attempts += 1
                try:
                    if worker is None or not spec.stateful:
                        worker = spec.cls(**spec.kwargs)
                    value = getattr(worker, job.method)(job.shard, *job.args)
                except Exception as exc:  # noqa: BLE001 - a failing shard is recorded, never fatal
                    errors.append(_one_line(exc))
                    worker = None
                    if job.attempts > self.cfg.max_retries:
                        on_result(JobResult(job, error=errors[-1], errors=errors))
                        break
                    continue
                on_result(JobResult(job, value=value, errors=errors))  # outside: the runner may stop the run
                break

    def share(self, value: Any) -> Any:
        return value


# Job arguments travel unpacked: Ray resolves object references only at the top level of a call.
def _call_worker(cls: type, kwargs: dict[str, Any], method: str, shard: int, *args: Any) -> Any:
    return getattr(cls(**kwargs), method)(shard, *args)


class _Actor:
    """The Ray actor around one worker: built once, then fed shards."""

    def __init__(self, cls: type, kwargs: dict[str, Any]):
        self.worker = cls(**kwargs)

    def call(self, method: str, shard: int, *args: Any) -> Any:
        return getattr(self.worker, method)(shard, *args)

    def pid(self) -> int:
        return os.getpid()


def start_ray(cfg: RayConfig) -> None:
    """Join ``cfg.address`` (or ``RAY_ADDRESS``), or start a token-protected Ray on loopback
    (``pairsift.common.ray_local`` says why and how)."""
    try:
        ray_local.start_ray(cfg.address, cfg.auth_mode, node_ip=cfg.node_ip, num_cpus=cfg.num_cpus,
                            logging_level="WARNING", configure_logging=True)
    except ray_local.RayAuthError as exc:
        raise UserError(str(exc)) from None


class RayExecutor:
    POLL_S = 0.5

    def __init__(self, cfg: ExecutorConfig, ray_cfg: RayConfig):
        start_ray(ray_cfg)
        self.cfg = cfg

    def _capacity(self, resources: Resources) -> int:
        import ray

        total = ray.cluster_resources()
        slots = [int(total.get("CPU", 1) // resources.cpus)] if resources.cpus > 0 else []
        if resources.gpus > 0:
            slots.append(int(total.get("GPU", 0) // resources.gpus))
        capacity = max(1, min(slots) if slots else 1)
        return min(capacity, self.cfg.max_workers) if self.cfg.max_workers else capacity

    def map(self, spec: WorkerSpec, jobs: list[Job], on_result: Callable[[JobResult], None]) -> None:
        import ray

        if not jobs:
            return
        if spec.resources.gpus > 0 and ray.cluster_resources().get("GPU", 0) < spec.resources.gpus:
            raise RuntimeError(
                f"the stage asks for {spec.resources.gpus} GPU per worker but the Ray cluster has none; "
                "set gpus: 0 to run it on CPU"
            )
        options: dict[str, Any] = {"num_cpus": spec.resources.cpus, "num_gpus": spec.resources.gpus}
        # Only non-secret settings (endpoint, region, credential file paths): runtime_env is stored in
        # Ray's tables, readable through the state API. Keys reach local workers by inheritance.
        if forwarded := storage_env():
            options["runtime_env"] = {"env_vars": forwarded}
        n_workers = min(len(jobs), self._capacity(spec.resources))
        queue = list(jobs)
        errors: dict[int, list[str]] = {job.shard: [] for job in jobs}
        inflight: dict[Any, tuple[Job, float, Any]] = {}
        actor_cls = ray.remote(max_restarts=0)(_Actor) if spec.stateful else None
        task = ray.remote(max_retries=0)(_call_worker) if not spec.stateful else None
        # actor -> a call that returns once the actor's setup() has run: a shard's deadline counts
        # from then, so a slow model load is not charged to (and does not expire) the first shards.
        starting: dict[Any, Any] = {}

        def new_actor() -> Any:
            actor = actor_cls.options(**options).remote(spec.cls, spec.kwargs)
            starting[actor] = actor.pid.remote()
            return actor

        idle_actors: list[Any] = [new_actor() for _ in range(n_workers)] if actor_cls else []

        def submit(job: Job) -> None:
            job.attempts += 1
            if actor_cls:
                actor = idle_actors.pop()
                ref = actor.call.remote(job.method, job.shard, *job.args)
            else:
                actor = None
                ref = task.options(**options).remote(spec.cls, spec.kwargs, job.method, job.shard, *job.args)
            inflight[ref] = (job, time.monotonic(), actor)

        def failed(job: Job, message: str) -> None:
            errors[job.shard].append(message)
            if job.attempts > self.cfg.max_retries:
                on_result(JobResult(job, error=message, errors=errors[job.shard]))
            else:
                queue.insert(0, job)

        def replace(actor: Any) -> None:
            starting.pop(actor, None)
            ray.kill(actor, no_restart=True)
            idle_actors.append(new_actor())

        try:
            while queue or inflight:
                while queue and (len(inflight) < n_workers) and (idle_actors or not actor_cls):
                    submit(queue.pop(0))
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self.POLL_S)
                for ref in ready:
                    job, _, actor = inflight.pop(ref)
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the stage raised; its worker is fine
                        if actor is not None:
                            idle_actors.append(actor)
                        failed(job, _one_line(exc.cause if exc.cause else exc))
                        continue
                    except ray.exceptions.RayError as exc:
                        # Anything else is the machinery failing under the shard, never the shard's
                        # fault: the worker or its node died (killed, OOM, node lost), the result was
                        # lost, the task could not be placed. Retry it elsewhere, like a crash.
                        if actor is not None:
                            replace(actor)
                        failed(job, f"worker lost: {_one_line(exc)}")
                        continue
                    if actor is not None:
                        idle_actors.append(actor)
                    on_result(JobResult(job, value=value, errors=errors[job.shard]))
                self._expire(inflight, starting, failed, replace)
        finally:
            for actor in idle_actors:
                ray.kill(actor, no_restart=True)
            for ref, (_, _, actor) in inflight.items():
                ray.cancel(ref, force=True) if actor is None else ray.kill(actor, no_restart=True)

    def share(self, value: Any) -> Any:
        """Put a large argument (a pool stage's fit) in the object store once; Ray resolves the
        reference for each task, so workers receive the value itself."""
        import ray

        return ray.put(value)

    def _expire(self, inflight: dict, starting: dict, failed: Callable, replace: Callable) -> None:
        import ray

        now = time.monotonic()
        if starting:
            ready = set(ray.wait(list(starting.values()), num_returns=len(starting), timeout=0)[0])
            for actor in [a for a, ref in starting.items() if ref in ready]:
                del starting[actor]
                for ref, (job, _, owner) in list(inflight.items()):
                    if owner is not None and owner == actor:
                        inflight[ref] = (job, now, owner)  # set up: the shard's own clock starts now
        for ref, (job, started, actor) in list(inflight.items()):
            if now - started <= self.cfg.shard_timeout_s:
                continue
            inflight.pop(ref)
            still_starting = actor is not None and actor in starting
            if actor is None:
                ray.cancel(ref, force=True)
            else:
                replace(actor)
            failed(job, f"shard deadline of {self.cfg.shard_timeout_s:g}s passed"
                        + (" while the worker was still setting up" if still_starting else ""))


def make_executor(cfg: ExecutorConfig, ray_cfg: RayConfig) -> LocalExecutor | RayExecutor:
    return LocalExecutor(cfg) if cfg.kind == "local" else RayExecutor(cfg, ray_cfg)

