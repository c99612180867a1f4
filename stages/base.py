"""The stage contract: what every curation step is, independent of how it is run.

A stage takes one shard's rows as an Arrow table and returns the same rows, in the same order,
with its own columns added. Rows it drops keep their place and get a ``reason``; nothing is deleted,
so the catalog can always answer "why is this sample gone". Stages know nothing about Ray, files or
retries: ``pipeline/`` wraps them. Per-sample failures are values (a reason), never exceptions.

``PoolStage`` is for steps that need the whole pool first (a top-fraction threshold, MetaCLIP's
global entry counts): ``partial`` summarises one shard, ``fit`` combines all summaries once, and
``apply`` then decides per shard with the fitted result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

REASON = "reason"  # null = kept by this stage; otherwise why the row was dropped
IMAGE = "image"  # encoded image bytes; the executor stores this column as a webdataset tar


class StageConfig(BaseModel):
    """Base for every stage's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(BaseModel):
    """What one worker of a stage needs. Fractions pack several workers on one device."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class ScoreSpec:
    """A number a stage writes or cuts at, worth a histogram in the report."""

    label: str  # what the number means, as an axis label
    threshold: str | None = None  # the key of this stage's fit holding the cutoff it applies
    rule: str = ""  # how that cutoff was chosen, in words ("top 70% of the pool")


@dataclass(frozen=True)
class ConceptSpec:
    """A list column naming what each row matched (metadata entries, kinds of PII): counted per value."""

    label: str
    names: str | None = None  # a fit table (entry_id, entry, source) naming integer values
    cap: str | None = None  # the fit key holding the per-concept cap that balancing applies


@dataclass(frozen=True)
class Contract:
    """What a stage reads, writes and drops with. The engine asks this (to validate a config before
    Ray starts, to read only the columns a stage needs, to know which reasons a retry may cure) and
    never names a stage, a column or a reason itself."""

    reads: tuple[str, ...] = ()  # columns needed from ingest or an earlier stage; IMAGE = the image bytes
    optional: tuple[str, ...] = ()  # columns used when an earlier stage wrote them
    writes: dict[str, pa.DataType] = field(default_factory=dict)  # columns added, with their types
    reasons: tuple[str, ...] = ()  # reasons a row may be dropped with
    # ``--retry-failed``: reasons a later attempt may cure (retried by default), reasons retried only
    # when asked for by name, and reasons no retry can cure, each with why (said when refused)
    retryable: tuple[str, ...] = ()
    retryable_on_request: tuple[str, ...] = ()
    final: dict[str, str] = field(default_factory=dict)
    captions: tuple[str, ...] = ()  # written columns of text the trainer reads as captions
    bulky: tuple[str, ...] = ()  # written columns too big for a sample's json (embeddings, match lists)
    # reason -> the largest share of a stage's rows it may take before the run stops: past it, the
    # environment is failing (a dead resolver), not the data
    abort_shares: dict[str, float] = field(default_factory=dict)
    # What the report shows, so that it never names a stage or a column: columns worth a histogram
    # (written here, or read and cut at with a fitted threshold), list columns of matched concepts, a
    # column of keep probabilities (rows kept in expectation), and reasons whose rows' images must
    # never be shown (blocklisted: not even as a thumbnail in a local file)
    scores: dict[str, ScoreSpec] = field(default_factory=dict)
    concepts: dict[str, ConceptSpec] = field(default_factory=dict)
    weight: str | None = None
    private_reasons: tuple[str, ...] = ()


class Stage(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[StageConfig]]
    # True when setup() is expensive (models, automata): the executor keeps the stage alive in an
    # actor pool instead of building it per shard.
    stateful: ClassVar[bool] = False
    # A stage that outputs ``image`` gets a tar of KEY.<ext>/KEY.txt/KEY.json samples: what goes in
    # each KEY.json, as json key -> column (a column the shard lacks is written as null).
    sample_json: ClassVar[dict[str, str]] = {"uid": "uid", "url": "url", "caption": "caption"}

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg

    @property
    def resources(self) -> Resources:
        return Resources()

    def contract(self) -> Contract:
        """Columns read and written, and the reasons this stage drops with (may depend on its config)."""
        return Contract()

    def setup(self) -> None:  # noqa: B027 - optional hook: most stages have nothing heavy to load
        """Load heavy things once per worker."""

    @abstractmethod
    def __call__(self, shard: pa.Table) -> pa.Table:
        """Return ``shard`` with this stage's columns (and ``reason`` if it drops rows) added."""

    def tar_stats(self, output: pa.Table, started_at: float, ended_at: float) -> dict[str, Any] | None:
        """A per-shard ``NNNNN_stats.json`` to write beside the image tar (None: none)."""
        return None


class PoolStage(Stage):
    """A stage with a whole-pool fit between a per-shard summary and the per-shard decision."""

    @abstractmethod
    def partial(self, shard: pa.Table) -> pa.Table:
        """A small summary of one shard (counts, scores) that ``fit`` combines."""

    @abstractmethod
    def fit(self, partials: list[pa.Table]) -> dict[str, Any]:
        """Combine every shard's summary into the pool-wide result.

        Values that are ``pa.Table`` are stored as parquet beside the fit (entry counts); everything
        else must be JSON-serialisable. ``apply`` receives the same dict back."""

    @abstractmethod
    def apply(self, shard: pa.Table, fitted: dict[str, Any], partial: pa.Table) -> pa.Table:
        """Decide for one shard, given the pool-wide fit and this shard's own summary."""

    def __call__(self, shard: pa.Table) -> pa.Table:  # in-process convenience: fit on one shard
        summary = self.partial(shard)
        return self.apply(shard, self.fit([summary]), summary)


def with_reason(shard: pa.Table, reasons: list[str | None]) -> pa.Table:
    """Append (or fill) the ``reason`` column, keeping an earlier reason where one exists."""
    column = pa.array(reasons, pa.string())
    if REASON in shard.column_names:
        earlier = shard.column(REASON).to_pylist()
        column = pa.array([e if e is not None else r for e, r in zip(earlier, reasons)], pa.string())
        return shard.set_column(shard.column_names.index(REASON), REASON, column)
    return shard.append_column(REASON, column)
