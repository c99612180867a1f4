"""One KEY=VALUE syntax for run, validate, plan and train."""

from __future__ import annotations

import pytest

from pairsift.common.overrides import OverrideError, parse_overrides, set_dotted
from pairsift.trainer.config import ConfigError
from pairsift.trainer.config import parse_overrides as train_overrides


def test_values_are_yaml_and_keys_dotted():
    assert parse_overrides(["steps=10", "data.workers=2", "lr=0.001", "x=null", "tags=[a, b]", "s=a=b"]) == {
        "steps": 10, "data.workers": 2, "lr": 0.001, "x": None, "tags": ["a", "b"], "s": "a=b"}
    data: dict = {"data": {"train": "x"}}
    set_dotted(data, "data.workers", 2)
    set_dotted(data, "eval.data", "y")
    assert data == {"data": {"train": "x", "workers": 2}, "eval": {"data": "y"}}


@pytest.mark.parametrize("bad", ["steps", "=3", "a=[unclosed"])
def test_malformed_overrides_are_one_line(bad):
    with pytest.raises(OverrideError) as caught:
        parse_overrides([bad])
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError):  # the trainer's CLI says the same thing in its own error type
        train_overrides([bad])


def test_a_value_in_the_way_of_a_section_is_refused():
    with pytest.raises(OverrideError, match="'steps' is not a section"):
        set_dotted({"steps": 3}, "steps.x", 1)
