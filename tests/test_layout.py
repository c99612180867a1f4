"""Imports point one way: stages know nothing of the pipeline or Ray; the trainer reads shards only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(("package", "forbidden"), [("stages", {"pipeline", "ray", "trainer"}),
                                                    ("trainer", {"pipeline", "stages"})])
def test_imports_point_one_way(package, forbidden):
    offenders = {str(p.relative_to(REPO)): sorted(imported_roots(p) & forbidden)
                 for p in sorted((REPO / package).rglob("*.py")) if imported_roots(p) & forbidden}
    assert not offenders, offenders


def test_every_registered_stage_imports_and_declares_its_contract():
    from stages import STAGES, stage_class
    from stages.base import Stage, StageConfig

    for name in STAGES:
        cls = stage_class(name)
        assert issubclass(cls, Stage) and cls.name == name, name
        assert issubclass(cls.config_class, StageConfig), name
