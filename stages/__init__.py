"""Curation steps, one module per stage family. See ``stages/base.py`` for the contract.

``STAGES`` maps the name a config uses to where the stage lives. Modules are imported only when a
config names them, so a text-only run never imports torch.
"""

from __future__ import annotations

import importlib

from pairsift.stages.base import Stage

STAGES: dict[str, str] = {
    "image_hashes": "pairsift.stages.image_hashes:ImageHashes",
    "dedup": "pairsift.stages.dedup:Dedup",
    "faces": "pairsift.stages.faces:Faces",
    "url_blocklist": "pairsift.stages.blocklist:UrlBlocklist",
    "hash_blocklist": "pairsift.stages.blocklist:HashBlocklist",
    "text_filter": "pairsift.stages.text_filter:TextFilter",
    "download": "pairsift.stages.download:Download",
    "image_filter": "pairsift.stages.image_filter:ImageFilter",
    "placeholder": "pairsift.stages.image_filter:Placeholder",
    "clip_score": "pairsift.stages.clip_score:ClipScore",
    "clip_filter": "pairsift.stages.clip_score:ClipFilter",
    "balance": "pairsift.stages.balance:Balance",
    "pii": "pairsift.stages.pii:Pii",
    "select": "pairsift.stages.select:Select",
    "rewrite": "pairsift.stages.rewrite:Rewrite",
    "enrich": "pairsift.stages.enrich:Enrich",
    "concept_tags": "pairsift.stages.concept_tags:ConceptTags",
}


class UnknownStage(KeyError):
    pass


def stage_path(name: str) -> str:
    """Where the stage lives ("module:Class"); an unknown name lists the ones that exist."""
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None


def import_stage(path: str) -> type[Stage]:
    module_name, class_name = path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def stage_class(name: str) -> type[Stage]:
    return import_stage(stage_path(name))
