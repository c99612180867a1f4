"""What every section of the run report reads: the run's catalog, its stages' contracts, number
formats and the matplotlib figure helpers (``pairsift.pipeline.report`` builds the page)."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from matplotlib.figure import Figure

from pairsift.pipeline.catalog import open_catalog, sql_ident, stage_labels
from pairsift.pipeline.run_dir import RunDir
from pairsift.stages import stage_class
from pairsift.stages.base import Contract, Stage

KEPT_COLOUR = "#59a14f"
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#a0cbe8", "#ffbe7d", "#ff9d9a", "#86bcb6", "#f1ce63", "#d4a6c8", "#d7b5a6", "#79706e"]


@dataclass
class RunView:
    run: RunDir
    meta: dict[str, Any]
    con: duckdb.DuckDBPyConnection
    present: list[str]  # labels with parts on disk, pipeline order, "ingest" first
    specs: dict[str, dict[str, Any]]  # label -> the stage's resolved config (with "stage")
    _stages: dict[str, Stage | None] = field(default_factory=dict)

    def kind(self, label: str) -> str | None:
        return self.specs.get(label, {}).get("stage")

    def stage(self, label: str) -> Stage | None:
        """The configured stage of ``label`` (None: ingest, or a stage this install no longer has)."""
        if label not in self._stages:
            self._stages[label] = build_stage(self.specs[label]) if label in self.specs else None
        return self._stages[label]

    def contract(self, label: str) -> Contract:
        stage = self.stage(label)
        try:
            return stage.contract() if stage is not None else Contract()
        except Exception:  # noqa: BLE001 - an unvalidated old config: its sections stay empty, the page is written
            return Contract()

    def column_types(self, label: str) -> dict[str, str]:
        return {row[0]: row[1] for row in self.con.execute(f"DESCRIBE {sql_ident(label)}").fetchall()}

    def columns(self, label: str) -> set[str]:
        return set(self.column_types(label))

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def fit_values(self, label: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.run.fit(label).read_text()).get("values", {}))
        except (OSError, ValueError, AttributeError):
            return {}

    def private_reasons(self) -> set[str]:
        """Reasons whose rows' images the report never shows, from every stage's contract."""
        return {r for label in self.specs for r in self.contract(label).private_reasons}


def build_stage(spec: dict[str, Any]) -> Stage | None:
    config = {k: v for k, v in spec.items() if k not in ("stage", "label")}
    try:
        cls = stage_class(spec["stage"])
    except Exception:  # noqa: BLE001 - a stage removed since the run: its sections just stay empty
        return None
    try:
        return cls(cls.config_class(**config))
    except Exception:  # noqa: BLE001 - a config that no longer validates here (a moved model) still reports
        return cls(cls.config_class.model_construct(**config))


def open_view(run_dir: Path) -> RunView:
    run = RunDir(run_dir)
    meta = run.read_run_json()
    con = open_catalog(run_dir)
    con.execute("SET enable_progress_bar = false")  # a report is not an interactive shell
    # words(x): caption length in words, used by the caption sections
    con.execute(r"CREATE TEMP MACRO words(x) AS length(regexp_split_to_array(trim(x), '\s+'))")
    specs = {s["label"]: s for s in meta.get("config", {}).get("stages", [])}
    return RunView(run, meta, con, stage_labels(run), specs)


# --- formatting and charts -------------------------------------------------------------------

def fmt_num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if value != value:  # NaN
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def fmt_pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def fmt_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def png_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def new_axes(width: float, height: float):
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x" if width > height * 3 else "y", alpha=0.25)
    return fig, ax
