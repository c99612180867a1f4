"""``KEY=VALUE`` overrides, one syntax for every command: ``pairsift run ... --set a.b=3`` and
``pairsift train ... --set steps=100`` (or ``steps=100``). Values are YAML scalars or flow
collections (``3``, ``true``, ``null``, ``[a, b]``, ``{k: v}``); keys are dotted paths into the config.
"""

from __future__ import annotations

from typing import Any

import yaml


class OverrideError(ValueError):
    """An override a user can fix; its message is one line."""


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["steps=10", "data.workers=2"]`` -> ``{"steps": 10, "data.workers": 2}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise OverrideError(f"override {item!r}: expected KEY=VALUE, e.g. input.shard_size=1000")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise OverrideError(f"override {item!r}: the value is not valid YAML ({' '.join(str(exc).split())[:120]})") from None
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, creating sections on the way; a non-mapping in the way is an error."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise OverrideError(f"override {dotted}: {part!r} is not a section")
    node[leaf] = value
