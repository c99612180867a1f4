"""How a training run starts: in this process, as torchrun-style ranks on this machine, or on Ray Train.

``train(cfg)`` picks the launcher from the config; each one ends in ``loop.run_worker`` per rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pairsift.common import ray_local
from pairsift.common.storage import write_atomic
from pairsift.configs import TINY_MODEL as TINY_MODEL_PATH
from pairsift.trainer.checkpoint import TrainResult
from pairsift.trainer.config import ConfigError, TrainConfig, build_config
from pairsift.trainer.loop import run_worker


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train with the configured launcher; returns rank 0's result."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 or cfg.launcher == "local":
        return run_worker(cfg, resume)  # already inside torchrun, or single process
    if cfg.launcher == "torchrun":
        return _launch_torchrun(cfg, resume)
    return _launch_ray(cfg, resume)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Resolve relative paths against this process's cwd, for workers that start elsewhere (Ray)."""
    def fix(p: str | None) -> str | None:
        if p is None or "::" in p:
            return p
        prefix = "local-dir:" if p.startswith("local-dir:") else ""
        path = Path(p.removeprefix(prefix))
        if path.exists():
            return prefix + str(path.resolve())
        if "{" in path.name and path.parent.is_dir():  # a brace pattern of shards
            return str(path.parent.resolve() / path.name)
        return p  # an open_clip model name, or a path the worker will report as missing

    data = cfg.data.model_copy(update={"train": fix(cfg.data.train)})
    upd: dict[str, Any] = {"out": str(Path(cfg.out).resolve()), "data": data, "model": fix(cfg.model),
                           "pretrained": fix(cfg.pretrained)}
    if cfg.eval is not None:
        upd["eval"] = cfg.eval.model_copy(update={"data": fix(cfg.eval.data)})
    return cfg.model_copy(update=upd)


TINY_MODEL = str(TINY_MODEL_PATH)


def train_on_shards(shards: str | Path, out: str | Path, steps: int, batch_size: int,
                    model: str = TINY_MODEL, eval_data: str | Path | None = None, **overrides: Any) -> TrainResult:
    """Shortcut for callers (the demo): train ``model`` on a shard dir; the model lands in ``<out>/final``.

    ``overrides`` are top-level config keys (``lr=1e-3``, ``threads=2``, ``data={"workers": 1}``)."""
    raw: dict[str, Any] = {"out": str(out), "model": model, "data": {"train": str(shards)},
                           "batch_size": batch_size, "steps": steps, "lr": 2e-3, "warmup": max(1, steps // 10)}
    if eval_data is not None:
        raw["eval"] = {"data": str(eval_data)}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and key in raw else value
    return train(build_config(raw))


def _launch_torchrun(cfg: TrainConfig, resume: bool) -> TrainResult:
    """``nproc`` ranks on this machine with torchrun's environment (env:// rendezvous), around a
    TCPStore hosted here on a socket bound to 127.0.0.1. torchrun itself is not used: its agent's
    store listens on every interface whatever --master_addr, --rdzv-endpoint, --local-addr or
    --standalone say (torch 2.14), and anyone reaching that unauthenticated store can join or
    disrupt the run."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "launch-config.json"
    write_atomic(cfg_file, cfg.model_dump_json())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, cfg.nproc, True, wait_for_workers=False,
                          master_listen_fd=listener.detach())  # the store owns the socket now
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), WORLD_SIZE=str(cfg.nproc), LOCAL_WORLD_SIZE=str(cfg.nproc),
               TORCHELASTIC_USE_AGENT_STORE="True")  # ranks are clients of this store, none hosts one
    env["OMP_NUM_THREADS"] = str(cfg.threads) if cfg.threads else os.environ.get("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pairsift.trainer.launch", str(cfg_file)] + (["--resume"] if resume else [])
    ranks = [subprocess.Popen(cmd, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(cfg.nproc)]
    code = _wait_for_ranks(ranks)
    del store
    if code != 0:
        raise RuntimeError(f"torchrun training failed with exit code {code}")
    return TrainResult.load(out)


def _wait_for_ranks(ranks: list[subprocess.Popen]) -> int:
    """Wait for every rank; once one fails, stop the others (they would wait for it forever)."""
    while any(rank.poll() is None for rank in ranks):
        if any(rank.returncode for rank in ranks):
            for rank in ranks:
                if rank.poll() is None:
                    rank.terminate()
            for rank in ranks:
                rank.wait()
            break
        time.sleep(0.2)
    return next((rank.returncode for rank in ranks if rank.returncode), 0)


def _ray_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function: the same run_worker, with Ray's process group already up."""
    run_worker(TrainConfig.model_validate(config["cfg"]), config["resume"])


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Env for Ray Train workers, set before Ray builds their process group."""
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    host = (cfg.ray.address or cfg.ray.node_ip).split("://")[-1].rsplit(":", 1)[0]
    if host.startswith("127."):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # a local cluster: gloo must not pick the machine's network card
    elif os.environ.get("GLOO_SOCKET_IFNAME"):
        env["GLOO_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"]
    return env


def ray_workers_use_gpu(device: str, nproc: int, cluster_gpus: float) -> bool:
    """Whether each Ray Train worker gets a GPU: decided by the GPUs the cluster has for its workers,
    not by the driver's own (a driver on a CPU head node still trains on GPU workers, and a GPU
    machine joining a CPU cluster does not ask for GPUs that no worker can have)."""
    if device == "cpu":
        return False
    enough = cluster_gpus >= nproc
    if device == "cuda" and not enough:
        raise ConfigError(f"device 'cuda' with launcher 'ray' needs {nproc} GPU(s), one per worker "
                          f"(nproc); the Ray cluster has {cluster_gpus:g}")
    return enough


def _launch_ray(cfg: TrainConfig, resume: bool) -> TrainResult:
    try:  # before ray is imported: the auth mode is read at import
        ray_local.start_ray(cfg.ray.address, cfg.ray.auth_mode, node_ip=cfg.ray.node_ip)
    except ray_local.RayAuthError as exc:
        raise ConfigError(str(exc)) from None
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ray_workers_use_gpu(cfg.device, cfg.nproc, ray.cluster_resources().get("GPU", 0))
    # The workers train on the device decided here, so it matches the process group's backend
    # (a worker that could see a GPU it was not given must not pick it under "auto").
    cfg = absolute_paths(cfg).model_copy(update={"device": "cuda" if use_gpu else "cpu"})
    out = Path(cfg.out)
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "resume": resume},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.nproc, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(out / "ray"), name="train",
                             worker_runtime_env={"env_vars": _worker_env(cfg)}),
    )
    trainer.fit()
    return TrainResult.load(out)


def _main(argv: list[str]) -> int:
    cfg = TrainConfig.model_validate_json(Path(argv[0]).read_text())
    run_worker(cfg, resume="--resume" in argv[1:])
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
