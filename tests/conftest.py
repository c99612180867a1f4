"""Shared fixtures: one small local Ray for the whole session, pinned to loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Ray workers inherit the environment of the process that starts Ray: let them import tests' helpers.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), str(REPO / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the real `stages` package before tests/stages

RAY_NODE_IP = "127.0.0.2"  # plain ray.init() binds to the network address; any loopback but .1 stays put


@pytest.fixture(scope="session")
def ray_local():
    """Start Ray once per test session (about 4 s), small, on loopback and as pairsift does: with
    token auth and a fresh token, exported before ``ray`` is imported."""
    from pairsift.pipeline.config import RayConfig
    from pairsift.pipeline.executor import start_ray

    start_ray(RayConfig(node_ip=RAY_NODE_IP, num_cpus=2))
    import ray

    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    _slow_modules_first(items)
    _skip_gpu_tests_without_cuda(items)


def _slow_modules_first(items) -> None:
    """The suite runs on two xdist workers, a file per worker at a time (pyproject's addopts): start
    the long end-to-end files (those with a ``slow`` test) first, so none of them is left running
    alone at the end. The order is the same in every worker, as xdist requires."""
    slow = {item.module.__name__ for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: file order kept otherwise


def _skip_gpu_tests_without_cuda(items) -> None:
    """GPU tests skip cleanly, with the reason, on machines without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run where a GPU is present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
