"""Imports point one way: stages know nothing of the pipeline or Ray; the trainer reads shards only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _root(module: str) -> str:
    """``pairsift.stages.base`` -> ``stages``; a third-party ``ray.data`` -> ``ray``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pairsift" and len(parts) > 1 else parts[0]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(_root(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(_root(node.module))
    return roots


@pytest.mark.parametrize("package", ["common", "pipeline", "stages", "trainer"])
def test_code_imports_the_installed_namespace_only(package):
    """Every import of our own code goes through ``pairsift.``: nothing installs a top-level
    ``pipeline``/``stages``/``trainer`` into site-packages."""
    bare = {"common", "pipeline", "stages", "trainer"}
    offenders = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            offenders.update({str(path.relative_to(REPO)): n for n in names if n.split(".")[0] in bare})
    assert not offenders, offenders


@pytest.mark.parametrize(("package", "forbidden"), [("common", {"pipeline", "stages", "trainer"}),
                                                    ("stages", {"pipeline", "ray", "trainer"}),
                                                    ("trainer", {"pipeline", "stages"})])
def test_imports_point_one_way(package, forbidden):
    offenders = {str(p.relative_to(REPO)): sorted(imported_roots(p) & forbidden)
                 for p in sorted((REPO / package).rglob("*.py")) if imported_roots(p) & forbidden}
    assert not offenders, offenders


def test_every_registered_stage_imports_and_declares_its_contract():
    from pairsift.stages import STAGES, stage_class
    from pairsift.stages.base import Stage, StageConfig

    for name in STAGES:
        cls = stage_class(name)
        assert issubclass(cls, Stage) and cls.name == name, name
        assert issubclass(cls.config_class, StageConfig), name
