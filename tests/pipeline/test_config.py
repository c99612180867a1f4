"""Config validation: every mistake is one line naming the key's path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pairsift.pipeline.config import CONFIGS_DIR, load_config, parse_config
from pairsift.pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BASE = {"run_dir": "/tmp/x", "input": {"path": "urls.parquet"}}


def error_of(data) -> str:
    with pytest.raises(UserError) as info:
        parse_config(data, source="cfg.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (BASE | {"inptu": {}}, "cfg.yaml: inptu: unknown key"),
        (BASE | {"input": {"path": "x", "shard_size": "many"}}, "cfg.yaml: input.shard_size: Input should be a valid integer"),
        (BASE | {"input": {"path": "x", "shard_size": 0}}, "input.shard_size: Input should be greater than 0"),
        (BASE | {"stages": [{"stage": "nope"}]}, "stages[0]: unknown stage 'nope'; known stages:"),
        (BASE | {"stages": [{"min_chars": 3}]}, "stages[0]: each stage entry needs a 'stage:' key"),
        (BASE | {"stages": [{"stage": "text_filter", "min_chars": "five"}]},
         "stages[0] (text_filter).min_chars: Input should be a valid integer"),
        (BASE | {"stages": [{"stage": "text_filter", "min_charz": 3}]}, "stages[0] (text_filter).min_charz: unknown key"),
        (BASE | {"stages": [{"stage": "text_filter"}, {"stage": "text_filter"}]}, "is used twice"),
        ({"input": {"path": "x"}}, "run_dir: Field required"),
        ([1, 2], "expected a mapping at the top level"),
    ],
)
def test_config_errors_name_the_key(data, expected):
    assert expected in error_of(data)


def test_labels_let_a_stage_run_twice():
    cfg = parse_config(BASE | {"stages": [{"stage": "text_filter"}, {"stage": "text_filter", "label": "strict",
                                                                    "min_chars": 20}]})
    assert [s.label for s in cfg.stages] == ["text_filter", "strict"]


def test_stage_hash_chain_changes_only_downstream():
    def hashes(min_chars):
        return parse_config(BASE | {"stages": [{"stage": "text_filter"}, {"stage": "download"}, {"stage": "image_filter"},
                                               {"stage": "text_filter", "label": "t2", "min_chars": min_chars}]}
                            ).stage_hashes()

    a, b = hashes(5), hashes(6)
    assert a["ingest"] == b["ingest"] and a["text_filter"] == b["text_filter"] and a["image_filter"] == b["image_filter"]
    assert a["t2"] != b["t2"] and a["shards"] != b["shards"]


def test_yaml_problems_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_config(str(bad))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n")
    with pytest.raises(UserError, match="aliases are not allowed"):
        load_config(str(bomb))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_config(str(empty))
    with pytest.raises(UserError, match="not found.*presets: .*demo"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
def test_every_preset_validates(preset, tmp_path, monkeypatch):
    """Presets are validated as shipped; files they name (a metadata list) are made in a scratch dir."""
    monkeypatch.chdir(tmp_path)
    for stage in yaml.safe_load((CONFIGS_DIR / f"{preset}.yaml").read_text()).get("stages", []):
        if "metadata" in stage:
            Path(stage["metadata"]).parent.mkdir(parents=True, exist_ok=True)
            Path(stage["metadata"]).write_text("red circle\n")
    cfg = load_config(preset)
    assert cfg.stages, "a preset without stages curates nothing"


@settings(max_examples=150, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12))
def test_arbitrary_yaml_values_never_crash(value):
    """Whatever a YAML file holds, parsing gives a config or one UserError line, never a traceback."""
    for data in (value, BASE | {"stages": value}, BASE | {"input": value}, BASE | {"stages": [value]}):
        try:
            parse_config(data)
        except UserError as exc:
            assert "\n" not in str(exc)


def test_cli_validate_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(BASE | {"stages": [{"stage": "download", "timeout_s": "soon"}]}))
    proc = subprocess.run([sys.executable, "-m", "pairsift.pipeline", "validate", str(bad)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "stages[0] (download).timeout_s" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_overrides_address_stages_by_label(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE | {"stages": [{"stage": "text_filter"}, {"stage": "download"},
                                                      {"stage": "image_filter", "label": "sizes"}]}))
    cfg = load_config(str(path), {"stages.text_filter.min_chars": 9, "stages.sizes.min_side": 32, "run_dir": "/r"})
    assert cfg.stages[0].config.min_chars == 9 and cfg.stages[2].config.min_side == 32 and cfg.run_dir == "/r"
    with pytest.raises(UserError, match="no stage labelled 'nope' \\(stages: text_filter, download, sizes\\)"):
        load_config(str(path), {"stages.nope.x": 1})


def test_a_stage_reading_what_no_earlier_stage_writes_is_refused_before_anything_runs():
    with pytest.raises(UserError, match=r"stages\[0\] \(image_filter\) reads width, height.*width is written by "
                                        r"download, which must come before it"):
        parse_config(BASE | {"stages": [{"stage": "image_filter"}, {"stage": "download"}]})
    with pytest.raises(UserError, match=r"\(clip_score\) reads image.*no stage writes image"):
        parse_config(BASE | {"stages": [{"stage": "clip_score", "model": "ViT-B-32"}]})
    # images that come with the input (webdataset tars) need no download
    parse_config(BASE | {"input": {"path": "shards/", "format": "webdataset"},
                         "stages": [{"stage": "clip_score", "model": "ViT-B-32"}]})
