"""Fixtures shared by the pipeline tests that run Ray workers on the test-only stages."""

from __future__ import annotations

import pytest
from cluster_stages import CLUSTER_STAGES
from toy_stages import TOY_STAGES

from pairsift.stages import STAGES


@pytest.fixture(scope="module")
def registry():
    """The toy and cluster stages in the registry, for one test module (workers import them by path)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, path in (TOY_STAGES | CLUSTER_STAGES).items():
            patch.setitem(STAGES, name, path)
        yield
