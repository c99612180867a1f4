"""select: SQL conditions and scores over earlier stages' columns, with DataComp's pool-wide fraction."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from pairsift.stages import stage_class
from pairsift.stages.clip_score import ClipFilter, ClipFilterConfig
from pairsift.stages.select import Select, SelectConfig, columns_in


def pool(n: int, seed: int = 0) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    clip = rng.uniform(0, 0.4, n).astype(np.float32)
    clip[::17] = np.nan  # not scored
    face = rng.uniform(0, 1, n).astype(np.float32)
    table = pa.table({"uid": [f"{i:032x}" for i in range(n)],
                      "clip_score": pa.array(clip, pa.float32(), mask=np.isnan(clip)),
                      "face_area": pa.array(face, pa.float32()),
                      "caption": [f"a photo of a {'dog' if i % 3 else 'cat'}" for i in range(n)]})
    return [table.slice(i, 250) for i in range(0, n, 250)]


def run(stage, shards: list[pa.Table]) -> pa.Table:
    """What the executor does: partial per shard, one fit, apply per shard."""
    partials = [stage.partial(s) for s in shards]
    fitted = stage.fit(partials)
    return pa.concat_tables([stage.apply(s, fitted, p) for s, p in zip(shards, partials)])


def test_score_and_fraction_match_clip_filter_exactly():
    shards = pool(2_000)
    ours = run(Select(SelectConfig(score="clip_score", fraction=0.3)), shards)
    theirs = run(ClipFilter(ClipFilterConfig(fraction=0.3)), shards)
    kept = [r is None for r in ours.column("reason").to_pylist()]
    assert kept == [r is None for r in theirs.column("reason").to_pylist()]
    assert ours.column("reason").to_pylist().count("no_score") == theirs.column("reason").to_pylist().count("no_clip_score")


def test_condition_and_score_combine_as_sql_says():
    shards = pool(1_000, seed=1)
    stage = stage_class("select")(SelectConfig(where="face_area < 0.5 AND caption LIKE '%dog%'",
                                               score="clip_score - 0.1 * face_area", threshold=0.1))
    out = run(stage, shards)
    table = pa.concat_tables(shards)
    clip = np.array(table.column("clip_score").to_pylist(), dtype=np.float64)
    face = table.column("face_area").to_numpy()
    dog = np.array(["dog" in c for c in table.column("caption").to_pylist()])
    passes = (face < 0.5) & dog
    score = (clip - 0.1 * face).astype(np.float32)
    want = np.where(~passes, "not_selected", np.where(np.isnan(clip), "no_score",
                    np.where(score >= np.float32(0.1), "kept", "score_below_threshold")))
    got = [r or "kept" for r in out.column("reason").to_pylist()]
    assert got == want.tolist()
    assert 50 < got.count("kept") < 500


def test_a_null_condition_drops_like_sql_where():
    table = pa.table({"uid": ["a" * 32, "b" * 32], "nsfw": pa.array([None, 0.05], pa.float32())})
    out = run(Select(SelectConfig(where="nsfw < 0.1")), [table])
    assert out.column("reason").to_pylist() == ["not_selected", None]


def test_columns_named_by_the_sql_are_the_declared_reads():
    assert columns_in('lower(caption) LIKE \'%x%\' AND "face area" < 0.5 AND coalesce(nsfw, 0) < 1') == (
        "caption", "face area", "nsfw")
    contract = Select(SelectConfig(where="face_area < 0.5", score="clip_score", fraction=0.2)).contract()
    assert contract.reads == ("face_area", "clip_score") and set(contract.writes) == {"select_score"}


@pytest.mark.parametrize("bad", [{}, {"score": "clip_score"}, {"fraction": 0.3}, {"where": "x <", "fraction": 0.1},
                                 {"score": "s", "fraction": 0.1, "threshold": 0.2}])
def test_incomplete_or_contradictory_configs_are_refused(bad):
    with pytest.raises(ValidationError):
        SelectConfig(**bad)


def test_the_sql_cannot_reach_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    table = pa.table({"uid": ["a" * 32], "caption": ["c"]})
    stage = Select(SelectConfig(where=f"(SELECT count(*) FROM read_text('{secret}')) > 0 OR caption = 'c'"))
    with pytest.raises(ValueError, match="select: .*(disabled|Permission)"):
        run(stage, [table])
