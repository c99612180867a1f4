"""The demo at its smallest size (tiny): curation must beat the raw pool by a clear margin (fixed seed)."""

from __future__ import annotations

import json

import pytest

from pairsift.pipeline.demo import run_demo
from pairsift.pipeline.verify import verify_run


@pytest.mark.slow
@pytest.mark.timeout(1200)  # minutes on an idle 2-core machine; more when it is shared
def test_tiny_demo_curated_beats_pool(tmp_path, ray_local):
    comparison = run_demo(tmp_path / "demo", size="tiny", seed=0, executor="ray")
    pool, curated = (next(r for r in comparison["rows"] if r["name"] == n) for n in ("pool", "curated"))
    assert curated["top1"] >= pool["top1"] + 0.10, comparison
    # the filter network finds clean pairs among those it scores (ground truth the pipeline never read)
    assert comparison["filter"]["precision"] > 0.8 and comparison["filter"]["recall"] > 0.5
    run = tmp_path / "demo" / "run"
    assert verify_run(run).ok
    assert json.loads((run / "report" / "comparison.json").read_text())["rows"][1]["name"] == "curated"
    assert (run / "report" / "index.html").exists()
