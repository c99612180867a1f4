"""Two ranks (gloo on loopback) under torchrun and under Ray Train match one process step for step.

Same global batch (32) and the same two logical readers, so each step sees the same samples; features
are gathered with gradients, so the loss and the update are those of one process up to float order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ray_outsider import (
    JOIN,
    KV_NAMESPACE,
    NO_TOKEN,
    READ_KV,
    current_gcs_port,
    listeners,
    outsider,
    with_token,
)
from synth_shards import tiny_config

from pairsift.trainer.config import ConfigError, build_config
from pairsift.trainer.launch import ray_workers_use_gpu
from pairsift.trainer.train import TrainResult, train

STEPS = 4


def _cfg(out: Path, corpus: Path, **kw):
    return build_config(tiny_config(out, corpus / "train", steps=STEPS,
                                    data={"train": str(corpus / "train"), "readers": 2}, **kw))


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """Single-process reference runs, one per loss, made on first use."""
    runs: dict[str, TrainResult] = {}

    def get(loss: str) -> TrainResult:
        if loss not in runs:
            runs[loss] = train(_cfg(tmp_path_factory.mktemp(f"one-{loss}"), corpus, loss=loss))
        return runs[loss]
    return get


def _assert_same_run(a: TrainResult, b: TrainResult) -> None:
    from safetensors.torch import load_file

    assert b.world_size == 2 and len(b.losses) == STEPS
    assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) < 1e-4, (a.losses, b.losses)
    wa = load_file(str(Path(a.final_dir) / "open_clip_model.safetensors"))
    wb = load_file(str(Path(b.final_dir) / "open_clip_model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    assert abs(float(wa["logit_scale"]) - 2.65926) > 1e-4  # it trained (init is log(1/0.07))


@contextmanager
def listening_meanwhile() -> Iterator[set]:
    """Every socket this process and its children open for listening while the block runs (sampled)."""
    before = listeners(include_self=True)
    seen: set = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(listeners(include_self=True) - before)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_listening_on_loopback_only(one_process, corpus, tmp_path):
    with listening_meanwhile() as opened:
        two = train(_cfg(tmp_path / "torchrun", corpus, launcher="torchrun", nproc=2))
    _assert_same_run(one_process("clip"), two)
    # the rendezvous store (here, in the launcher) and gloo's pair sockets (in the ranks)
    assert {name for name, *_ in opened} >= {"python"} and len({pid for _, pid, *_ in opened}) >= 2, opened
    assert all(ip.startswith("127.") for _, _, ip, _ in opened), opened


@pytest.mark.slow
def test_ray_train_two_workers_match_one_process_with_siglip(one_process, corpus, tmp_path):
    """SigLIP here (its ranks exchange text features pairwise), CLIP's all-gather under torchrun."""
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    try:
        two = train(_cfg(tmp_path / "ray", corpus, launcher="ray", nproc=2, loss="siglip"))
        _assert_closed_to_outsiders(ray)
    finally:
        if started_here:
            ray.shutdown()
    _assert_same_run(one_process("siglip"), two)


def _assert_closed_to_outsiders(ray) -> None:
    """The Ray that `launcher: ray` started (or joined) answers only a process holding its token."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(b"probe", b"trainer-wrote-this", namespace=KV_NAMESPACE.encode())
    port = current_gcs_port()
    refused = outsider(READ_KV, port, NO_TOKEN)
    assert refused.returncode != 0 and "trainer-wrote-this" not in refused.stdout
    assert "VALUE" not in outsider(JOIN, port, NO_TOKEN).stdout
    assert "VALUE b'trainer-wrote-this'" in outsider(READ_KV, port, with_token()).stdout


def test_ray_workers_get_gpus_from_what_the_cluster_has_not_the_driver():
    """`launcher: ray` asks for GPUs when the cluster has one per worker, whatever this process sees;
    "cuda" on a cluster without enough is one clear line, not a run waiting for resources forever."""
    assert ray_workers_use_gpu("auto", 2, cluster_gpus=2) is True
    assert ray_workers_use_gpu("auto", 2, cluster_gpus=1) is False
    assert ray_workers_use_gpu("auto", 1, cluster_gpus=0) is False
    assert ray_workers_use_gpu("cpu", 1, cluster_gpus=8) is False
    assert ray_workers_use_gpu("cuda", 4, cluster_gpus=4) is True
    with pytest.raises(ConfigError, match="needs 2 GPU.*has 1$"):
        ray_workers_use_gpu("cuda", 2, cluster_gpus=1)
