"""The demo at its smallest size (tiny): curation must beat the raw pool by a clear margin (fixed seed),
and a second run of the same seed must print the same table from byte-identical shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pairsift.pipeline.demo import DEMO_PORT, DemoSize, demo_sizes, run_demo
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.verify import verify_run


def _table(comparison: dict) -> dict:
    """What the printed table and the README show: everything but the wall times."""
    return {k: v for k, v in comparison.items() if k not in ("seconds", "phases")}


def _tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # minutes on an idle 2-core machine; more when it is shared
def test_tiny_demo_curated_beats_pool_and_repeats_exactly(tmp_path, ray_local):
    first = run_demo(tmp_path / "first", size="tiny", seed=0, executor="ray", port=DEMO_PORT)
    pool, curated = (next(r for r in first["rows"] if r["name"] == n) for n in ("pool", "curated"))
    assert curated["top1"] >= pool["top1"] + 0.10, first
    # the filter network finds clean pairs among those it scores (ground truth the pipeline never read)
    assert first["filter"]["precision"] > 0.8 and first["filter"]["recall"] > 0.5
    run = tmp_path / "first" / "run"
    assert verify_run(run).ok
    assert json.loads((run / "report" / "comparison.json").read_text())["rows"][1]["name"] == "curated"
    assert (run / "report" / "index.html").exists()
    assert set(first["phases"]) >= {"synthesize", "train filter network", "serve + curate (Ray)", "train on curated"}

    second = run_demo(tmp_path / "second", size="tiny", seed=0, executor="ray", port=DEMO_PORT)
    assert _table(second) == _table(first)
    for stage in ("download", "shards"):
        shards = _tar_bytes(tmp_path / "first" / "run" / stage)
        assert shards and shards == _tar_bytes(tmp_path / "second" / "run" / stage), stage


def test_every_demo_size_in_the_yaml_is_valid_and_tiny_is_the_smallest():
    sizes = demo_sizes()
    assert {"tiny", "small", "default", "large"} <= set(sizes)
    assert all(isinstance(s, DemoSize) for s in sizes.values())
    assert min(sizes.values(), key=lambda s: s.pool) == sizes["tiny"]


def test_a_malformed_sizes_file_is_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "sizes.yaml"
    bad.write_text("tiny: {pool: 2000, shard_size: 1000, seed_pairs: 1, test_per_concept: 1, filter_steps: 1,"
                   " train_steps: 1, batch_size: 0}\n")
    with pytest.raises(UserError, match=r"tiny\.batch_size: Input should be greater than 0"):
        demo_sizes(bad)
    bad.write_text("tiny: {pool: 2000, shard_sizes: 1000}\n")
    with pytest.raises(UserError, match=r"sizes\.yaml: tiny\.") as info:
        demo_sizes(bad)
    assert "\n" not in str(info.value)


def test_a_taken_port_fails_at_once_with_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}.*--port"):
            run_demo(tmp_path / "demo", size="tiny", port=port)
    assert not (tmp_path / "demo" / "corpus").exists()  # nothing was synthesized first
