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
    """Start Ray once per test session (about 4 s), small and on loopback."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.executor import start_ray

    start_ray(RayConfig(node_ip=RAY_NODE_IP, num_cpus=2))
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
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
