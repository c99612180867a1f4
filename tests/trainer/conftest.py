"""Fixtures for trainer tests: a small synthetic webdataset written once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from synth_shards import write_shards  # noqa: E402  (this folder's helper module)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """``train/``: 2,400 samples in 8 shards; ``test/``: 600 held-out samples with class names."""
    root = tmp_path_factory.mktemp("trainer-corpus")
    write_shards(root / "train", 2400, 300, seed=1)
    write_shards(root / "test", 600, 300, seed=2, test_set=True)
    return root
