"""The spine: ingest, stages run through both executors, resume, config-hash invalidation, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from toy_stages import TOY_STAGES

from pairsift.pipeline.catalog import funnel, query
from pairsift.pipeline.config import parse_config
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.run_dir import RunDir, shard_of
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.verify import verify_run
from pairsift.stages import STAGES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def toy_registry(monkeypatch):
    for name, path in TOY_STAGES.items():
        monkeypatch.setitem(STAGES, name, path)


def make_pool(path: Path, n: int = 500) -> list[dict]:
    rows = [{"url": f"http://127.0.0.1:1/img/{i}.jpg", "caption": "x" * (i % 37), "extra": i} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def config(tmp_path: Path, kind: str = "local", min_chars: int = 5, fraction: float = 0.5, **extra) -> dict:
    return {
        "run_dir": str(tmp_path / "run"),
        "input": {"path": str(tmp_path / "pool.parquet"), "shard_size": 64},
        "executor": {"kind": kind, "max_retries": 1},
        "ray": {"node_ip": "127.0.0.2"},
        "stages": [
            {"stage": "caption_length", "min_chars": min_chars, **extra},
            {"stage": "top_fraction", "fraction": fraction},
        ],
        "shards": {"samples_per_shard": 50},
    }


def versions(run: RunDir, label: str) -> dict[int, str]:
    out = {}
    for marker in run.done_markers(label):
        out[shard_of(marker)] = json.loads(marker.read_text())["version"]
    return out


def test_local_run_funnel_matches_rules(tmp_path):
    rows = make_pool(tmp_path / "pool.parquet")
    summary = run_pipeline(parse_config(config(tmp_path)))
    assert summary.n_input_shards == 8  # 500 rows / 64
    stages = {s.label: s for s in funnel(tmp_path / "run")}
    short = sum(1 for r in rows if len(r["caption"]) < 5)
    assert stages["ingest"].rows_in == 500
    assert stages["caption_length"].dropped == {"too_short": short}
    assert stages["top_fraction"].rows_in == 500 - short
    assert all(s.balanced for s in stages.values())
    assert verify_run(tmp_path / "run").ok
    # the pool-wide threshold: the length at index int(N * fraction) of the descending sort
    lengths = sorted((len(r["caption"]) for r in rows if len(r["caption"]) >= 5), reverse=True)
    threshold = lengths[int(len(lengths) * 0.5)]
    kept = sum(1 for n in lengths if n >= threshold)
    assert stages["top_fraction"].kept == kept
    # the catalog joins every stage by uid and says where each row left
    _, by_stage = query(tmp_path / "run", "SELECT dropped_at, count(*) FROM samples GROUP BY 1 ORDER BY 1 NULLS FIRST")
    assert dict(by_stage) == {None: kept, "caption_length": short, "top_fraction": 500 - short - kept}
    _, extra = query(tmp_path / "run", "SELECT sum(source_extra) FROM samples")
    assert extra[0][0] == sum(range(500))  # extra input columns are kept, as source_<name>


def test_ray_executor_gives_the_same_result_as_local(tmp_path, ray_local):
    make_pool(tmp_path / "pool.parquet")
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local_dir.mkdir()
    ray_dir.mkdir()
    for d in (local_dir, ray_dir):
        (d / "pool.parquet").write_bytes((tmp_path / "pool.parquet").read_bytes())
    run_pipeline(parse_config(config(local_dir, "local")))
    run_pipeline(parse_config(config(ray_dir, "ray")))
    sql = "SELECT uid, caption_len, length_threshold, reason FROM samples ORDER BY uid"
    assert query(local_dir / "run", sql) == query(ray_dir / "run", sql)
    assert json.loads((local_dir / "run/shards/_meta/sizes.json").read_text()) == \
        json.loads((ray_dir / "run/shards/_meta/sizes.json").read_text())


def test_rerun_skips_everything_and_config_change_redoes_only_later_stages(tmp_path):
    make_pool(tmp_path / "pool.parquet")
    run = RunDir(tmp_path / "run")
    run_pipeline(parse_config(config(tmp_path)))
    first = {label: versions(run, label) for label in ("caption_length", "top_fraction")}

    again = run_pipeline(parse_config(config(tmp_path)))
    assert [r.shards_done for r in again.stages] == [0, 0, 0]
    assert {label: versions(run, label) for label in first} == first

    run_pipeline(parse_config(config(tmp_path, fraction=0.25)))
    assert versions(run, "caption_length") == first["caption_length"]  # before the change: untouched
    changed = versions(run, "top_fraction")
    assert set(changed) == set(first["top_fraction"])
    assert all(changed[s] != first["top_fraction"][s] for s in changed)

    run_pipeline(parse_config(config(tmp_path, min_chars=10, fraction=0.25)))
    assert all(versions(run, "caption_length")[s] != v for s, v in first["caption_length"].items())
    stages = {s.label: s for s in funnel(tmp_path / "run")}
    assert stages["caption_length"].dropped["too_short"] == 500 - sum(1 for i in range(500) if i % 37 >= 10)


def test_failing_shard_is_recorded_and_the_rest_finish_then_rerun_repairs(tmp_path, ray_local):
    rows = make_pool(tmp_path / "pool.parquet")
    poison = rows[130]["caption"]  # shard 2 (rows 128..191) holds it; other shards may too
    flag = tmp_path / "still-broken"
    flag.write_text("")
    cfg = config(tmp_path, "ray", fail_on_shard_with=poison, fail_flag_file=str(flag))
    summary = run_pipeline(parse_config(cfg))
    poisoned = {i // 64 for i, r in enumerate(rows) if r["caption"] == poison}
    assert set(summary.failed["caption_length"]) == poisoned
    assert "poisoned shard" in next(iter(summary.failed["caption_length"].values()))
    assert summary.stages[0].shards_done == 8 - len(poisoned)
    assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "failed_shards"

    flag.unlink()  # the cause goes away; the same command repairs exactly what failed
    repaired = run_pipeline(parse_config(cfg))
    assert repaired.stages[0].shards_done == len(poisoned)
    assert not repaired.failed
    assert sum(s.rows_in for s in funnel(tmp_path / "run") if s.label == "caption_length") == 500


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from toy_stages import TOY_STAGES
    from pairsift.stages import STAGES
    STAGES.update(TOY_STAGES)
    from pairsift.pipeline.config import parse_config
    from pairsift.pipeline.runner import run_pipeline
    import json
    run_pipeline(parse_config(json.loads(open({cfg!r}).read())))
""")


def test_sigkill_of_the_driver_then_rerun_equals_an_uninterrupted_run(tmp_path):
    make_pool(tmp_path / "pool.parquet", n=640)
    cfg = config(tmp_path, "local", sleep_s=0.4)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(REPO / "tests"), cfg=str(cfg_path)))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=open(tmp_path / "driver.log", "w"))
    run = RunDir(tmp_path / "run")
    deadline = time.monotonic() + 120
    while len(versions(run, "caption_length")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(versions(run, "caption_length"))
    assert 3 <= done_before < 10, "the kill should land mid-stage"

    resumed = run_pipeline(parse_config(cfg))
    assert resumed.stages[0].shards_done == 10 - done_before  # only the missing shards ran

    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    (clean_dir / "pool.parquet").write_bytes((tmp_path / "pool.parquet").read_bytes())
    run_pipeline(parse_config(config(clean_dir, "local")))
    sql = "SELECT uid, caption_len, length_threshold, reason, dropped_at FROM samples ORDER BY uid"
    assert query(tmp_path / "run", sql) == query(clean_dir / "run", sql)
    _, dupes = query(tmp_path / "run", "SELECT count(*) - count(DISTINCT uid) FROM samples")
    assert dupes[0][0] == 0
    assert not list((tmp_path / "run").rglob("*.tmp"))  # no half-written file under any name
    assert verify_run(tmp_path / "run").ok


def test_verify_catches_a_damaged_run(tmp_path):
    make_pool(tmp_path / "pool.parquet")
    run_pipeline(parse_config(config(tmp_path)))
    shards = tmp_path / "run" / "shards"
    sizes = json.loads((shards / "_meta/sizes.json").read_text())
    sizes["00000.tar"] += 1
    (shards / "_meta/sizes.json").write_text(json.dumps(sizes))
    (tmp_path / "run" / "caption_length" / "part-00003.parquet").unlink()
    problems = verify_run(tmp_path / "run").problems
    assert any("sizes.json says" in p for p in problems)
    assert any("caption_length shard 3" in p for p in problems)


def test_a_dominant_environment_failure_stops_the_run_with_one_line(tmp_path):
    from pairsift.pipeline.errors import UserError

    make_pool(tmp_path / "pool.parquet")
    cfg = config(tmp_path, every_row_reason="dns_error")
    cfg["executor"]["abort_min_rows"] = 100
    cfg["executor"]["abort_on_reason"] = {"dns_error": 0.5}  # download declares this share itself
    with pytest.raises(UserError, match=r"stopping caption_length: 100% of the first 128 rows failed with dns_error"):
        run_pipeline(parse_config(cfg))
    # what finished is kept: the rerun after the fix resumes instead of starting over
    assert len(versions(RunDir(tmp_path / "run"), "caption_length")) == 2
    cfg["executor"]["abort_on_reason"] = {}
    summary = run_pipeline(parse_config(cfg))
    assert summary.stages[0].shards_done == 6


def test_captions_for_the_trainer_fit_clips_context():
    from open_clip.tokenizer import SimpleTokenizer

    from pairsift.pipeline.shards import CaptionFitter

    encode = SimpleTokenizer().encode
    long_caption = " ".join(f"word{i}" for i in range(200))
    fitted = CaptionFitter(77)(long_caption)
    assert len(encode(fitted)) <= 75 < len(encode(fitted + " word999"))  # as long as fits, cut between words
    assert long_caption.startswith(fitted) and long_caption[len(fitted)] == " "
    assert CaptionFitter(77)("a red circle") == "a red circle"
    assert CaptionFitter(77, "drop")(long_caption) is None
    row = {"caption": "short", "rewrites": ["fine", long_caption], "enriched_caption": long_caption}
    assert CaptionFitter(77, "drop", ("rewrites", "enriched_caption")).fit_row(row) and row["rewrites"] == ["fine"] and row["enriched_caption"] is None
    assert not CaptionFitter(77, "drop").fit_row({"caption": long_caption})



def test_an_ablation_reuses_the_finished_prefix_and_recomputes_the_rest(tmp_path):
    from pairsift.pipeline.demo import ablation_run

    make_pool(tmp_path / "pool.parquet")
    cfg = parse_config(config(tmp_path))
    run_pipeline(cfg)
    first = versions(RunDir(tmp_path / "run"), "caption_length")
    ablation_run(cfg, tmp_path / "run", "top_fraction", tmp_path / "variant")
    variant = RunDir(tmp_path / "variant")
    assert versions(variant, "caption_length") == first  # reused, not recomputed
    assert not variant.stage_dir("top_fraction").exists()
    kept = {s.label: s for s in funnel(tmp_path / "variant")}["caption_length"].kept
    assert sum(json.loads((tmp_path / "variant/shards/_meta/sizes.json").read_text()).values()) == 0  # toy: no images
    assert json.loads((tmp_path / "variant/shards/_markers/00000.done.json").read_text())["rows_in"] == min(kept, 50)
    assert verify_run(tmp_path / "variant").ok
    # the original run is untouched by the variant's writes (atomic renames replace, never write through)
    assert versions(RunDir(tmp_path / "run"), "caption_length") == first and verify_run(tmp_path / "run").ok


def test_spread_domains_deals_each_domain_over_the_input_shards_of_a_run(tmp_path):
    """`input.spread_domains` through `pairsift run`: the same rows and uids as a plain run, each
    domain over every shard, and a spill a killed ingest left behind is swept on the next run."""
    blocks = [320, 160, 120, 40]  # a list sorted by domain: plain shards would each hammer one host
    rows = [{"url": f"http://host{d}.test/{i}.jpg", "caption": f"caption number {d} {i}"}
            for d, n in enumerate(blocks) for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    plain_cfg = config(tmp_path, min_chars=1) | {"run_dir": str(tmp_path / "plain")}
    spread_cfg = config(tmp_path, min_chars=1)
    spread_cfg["input"] = spread_cfg["input"] | {"spread_domains": True}
    (tmp_path / "run").mkdir()
    (tmp_path / "run/.spread-left-by-a-kill.tmp").mkdir()
    (tmp_path / "run/.spread-left-by-a-kill.tmp/bucket-00000.parquet").write_bytes(b"partial")
    run_pipeline(parse_config(plain_cfg))
    run_pipeline(parse_config(spread_cfg))

    def ingested(root: Path) -> list[pa.Table]:
        return [pq.read_table(p) for p in sorted((root / "ingest").glob("part-*.parquet"))]

    plain, spread = ingested(tmp_path / "plain"), ingested(tmp_path / "run")
    assert sorted(pa.concat_tables(spread).column("uid").to_pylist()) == \
           sorted(pa.concat_tables(plain).column("uid").to_pylist())
    host = lambda url: url.split("/")[2]  # noqa: E731
    total = {h: sum(host(r["url"]) == h for r in rows) for h in {host(r["url"]) for r in rows}}
    for shard in spread:  # 10 shards: every domain's rows dealt evenly
        counts = {h: sum(host(u) == h for u in shard.column("url").to_pylist()) for h in total}
        assert all(abs(counts[h] - total[h] / len(spread)) <= 1 for h in total), counts
    assert len({host(u) for u in plain[0].column("url").to_pylist()}) == 1  # what spreading prevents
    assert not list((tmp_path / "run").glob(".spread-*"))
    assert verify_run(tmp_path / "run").ok


def test_an_input_without_one_usable_url_fails_fast_with_one_line(tmp_path):
    rows = [{"url": [None, "", "   "][i % 3], "caption": f"caption {i}"} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([("url", pa.string()), ("caption", pa.string())])),
                   tmp_path / "pool.parquet")
    with pytest.raises(UserError, match=r"none of its 30 rows has a url \(column 'url'"):
        run_pipeline(parse_config(config(tmp_path)))
    assert not list((tmp_path / "run").glob("caption_length/part-*"))  # no stage ran
