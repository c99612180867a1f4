"""MetaCLIP balancing: cap how often each metadata entry is represented in the curated pool.

Three steps over the pool (``PoolStage``):

1. ``partial`` matches each caption against the metadata once (``stages/matching.py``) and keeps the
   distinct matched entry ids per uid; the executor stores them and hands them to both later steps.
2. ``fit`` sums them into global counts (a caption counts an entry at most once) and computes the
   report data: sorted counts before and expected after balancing, head entries (count > t).
3. ``apply`` keeps a pair with probability P = 1 - prod_e (1 - p_e), p_e = min(1, t / count_e), over
   its matched entries: an entry seen more than t times keeps about t of its pairs, tail entries keep
   all of theirs. The draw is a hash of (seed, uid), so any shard layout gives the same subset, and
   raising t only adds pairs. ``online`` keeps every matched pair and writes P as ``keep_prob`` so a
   data loader can redraw each epoch. Pairs that match no entry are dropped (``no_metadata_match``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from pairsift.stages.base import ConceptSpec, Contract, PoolStage, StageConfig, with_reason
from pairsift.stages.matching import MATCHED_ENTRIES_TYPE, Matcher
from pairsift.stages.metadata import Metadata, load_metadata

REASON_NO_MATCH = "no_metadata_match"
REASON_BALANCED_OUT = "balanced_out"
CAPTION = "caption"
UID = "uid"


class BalanceConfig(StageConfig):
    metadata: str = Field(description="entry list: our parquet/json, MetaCLIP's metadata.json, or text lines")
    mode: Literal["metaclip", "normalized"] = Field(
        "metaclip",
        description="metaclip = MetaCLIP's exact case-sensitive rule; normalized = NFKC, case-folded",
    )
    plural_folding: bool = Field(False, description="normalized mode only: 'dogs' matches 'dog'")
    t: int = Field(20_000, gt=0, description="matches per entry kept in expectation (MetaCLIP-400M: 20k)")
    t_relative: float | None = Field(
        None, gt=0,
        description="if set, t = this x the mean matches per matched entry of the pool, found at fit time "
                    "(a pool-size-free way to say 'cap entries at half the average', as the demo does)",
    )
    seed: int = Field(0, description="with the uid, decides each pair's draw")
    online: bool = Field(False, description="keep matched pairs and write keep_prob instead of dropping")

    @field_validator("metadata")
    @classmethod
    def _metadata_exists(cls, value: str) -> str:
        if not Path(value).is_file():
            raise ValueError(f"metadata file not found: {value} (build one with 'pairsift metadata build')")
        return value

    @model_validator(mode="after")
    def _folding_needs_normalized(self) -> BalanceConfig:
        if self.plural_folding and self.mode != "normalized":
            raise ValueError("plural_folding needs mode: normalized (MetaCLIP's rule is exact)")
        return self


class Balance(PoolStage):
    name: ClassVar[str] = "balance"
    config_class: ClassVar[type[StageConfig]] = BalanceConfig
    stateful: ClassVar[bool] = True  # building the matcher for 500k entries takes seconds

    cfg: BalanceConfig

    def __init__(self, cfg: BalanceConfig):
        super().__init__(cfg)
        self._metadata: Metadata | None = None
        self._matcher: Matcher | None = None

    def contract(self) -> Contract:
        writes = {"matched_entries": pa.list_(pa.int32()), "n_matches": pa.int32(), "keep_prob": pa.float32()}
        entries = ConceptSpec("MetaCLIP entries", names="counts", cap="t")
        return Contract(reads=(CAPTION,), writes=writes, reasons=(REASON_NO_MATCH, REASON_BALANCED_OUT),
                        bulky=("matched_entries",), concepts={"matched_entries": entries},
                        weight="keep_prob" if self.cfg.online else None)

    def setup(self) -> None:
        metadata = self.metadata
        self._matcher = Matcher(metadata.entries, self.cfg.mode, self.cfg.plural_folding)

    @property
    def metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = load_metadata(self.cfg.metadata)
        return self._metadata

    @property
    def matcher(self) -> Matcher:
        if self._matcher is None:
            self.setup()
        assert self._matcher is not None
        return self._matcher

    def partial(self, shard: pa.Table) -> pa.Table:
        matched = self.matcher.match(shard.column(CAPTION))
        return pa.table({UID: shard.column(UID), "matched_entries": matched})

    def fit(self, partials: Sequence[pa.Table]) -> dict[str, Any]:
        n_entries = len(self.metadata)
        counts = np.zeros(n_entries, dtype=np.int64)
        n_captions = n_captions_matched = 0
        for part in partials:  # one table at a time: memory stays at one shard's summary
            lists = _combined(part.column("matched_entries"))
            counts += np.bincount(_values(lists), minlength=n_entries)
            lengths = _lengths(lists)
            n_captions += len(lengths)
            n_captions_matched += int((lengths > 0).sum())
        t = self.effective_t(counts)
        probs = entry_probabilities(counts, t)
        expected_after = np.zeros(n_entries, dtype=np.float64)  # expected kept matches per entry
        expected_kept = 0.0  # expected kept pairs
        for part in partials:
            lists = _combined(part.column("matched_entries"))
            keep = keep_probabilities(lists, probs)
            expected_kept += float(keep.sum())
            expected_after += np.bincount(
                _values(lists), weights=np.repeat(keep, _lengths(lists)), minlength=n_entries
            )
        result = self._fit_result(counts, expected_after, t)
        result.update(
            n_captions=n_captions, n_captions_matched=n_captions_matched, expected_kept=expected_kept
        )
        return result

    def effective_t(self, counts: np.ndarray) -> int:
        if self.cfg.t_relative is None:
            return self.cfg.t
        matched = counts[counts > 0]
        return max(1, round(self.cfg.t_relative * float(matched.mean()))) if len(matched) else 1

    def _fit_result(self, counts: np.ndarray, expected_after: np.ndarray, t: int) -> dict[str, Any]:
        total = int(counts.sum())
        head = counts > t
        seen = counts > 0
        counts_table = pa.table(
            {
                "entry_id": pa.array(np.arange(len(counts), dtype=np.int32)),
                "entry": pa.array(self.metadata.entries, pa.string()),
                "count": pa.array(counts),
                "source": pa.array(self.metadata.sources, pa.string()),
            }
        )
        distribution = pa.table(
            {  # each column sorted on its own: the curve before and after
                "rank": pa.array(np.arange(int(seen.sum()), dtype=np.int32)),
                "count_before": pa.array(np.sort(counts[seen])[::-1]),
                "expected_after": pa.array(np.sort(expected_after[seen])[::-1]),
            }
        )
        return {
            "counts": counts_table,
            "distribution": distribution,
            "t": t,
            "seed": self.cfg.seed,
            "mode": self.cfg.mode,
            "n_entries": len(counts),
            "n_matched_entries": int(seen.sum()),
            "n_head_entries": int(head.sum()),
            "total_matches": total,
            "head_share": float(counts[head].sum() / total) if total else 0.0,
        }

    def apply(self, shard: pa.Table, fitted: dict[str, Any], partial: pa.Table) -> pa.Table:
        lists = _aligned_matches(shard, partial)
        counts = fitted["counts"].column("count").to_numpy()
        keep_prob = keep_probabilities(lists, entry_probabilities(counts, int(fitted["t"])))
        lengths = _lengths(lists)
        matched = lengths > 0
        if self.cfg.online:
            kept = matched
        else:
            kept = matched & (
                uniform_draws(shard.column(UID).to_pylist(), self.cfg.seed, keep_prob) < keep_prob
            )
        reasons = np.where(matched, np.where(kept, None, REASON_BALANCED_OUT), REASON_NO_MATCH).tolist()
        out = shard.append_column("matched_entries", lists)
        out = out.append_column("n_matches", pa.array(lengths.astype(np.int32)))
        out = out.append_column("keep_prob", pa.array(keep_prob.astype(np.float32)))
        return with_reason(out, reasons)


def choose_t(partials: Sequence[pa.Table], n_entries: int, target_kept: float) -> int:
    """The smallest t whose expected number of kept pairs reaches ``target_kept``.

    Expected kept pairs grow with t, so bisection over t on the stored partials finds it without
    matching again (about 25 passes over the partials). If even keeping every matched pair falls
    short, returns the largest count (no entry capped)."""
    counts = np.zeros(n_entries, dtype=np.int64)
    for part in partials:
        counts += np.bincount(_values(_combined(part.column("matched_entries"))), minlength=n_entries)

    def expected_kept(t: int) -> float:
        probs = entry_probabilities(counts, t)
        return sum(
            float(keep_probabilities(_combined(p.column("matched_entries")), probs).sum()) for p in partials
        )

    low, high = 1, max(1, int(counts.max()))
    while low < high:
        middle = (low + high) // 2
        if expected_kept(middle) >= target_kept:
            high = middle
        else:
            low = middle + 1
    return low


def entry_probabilities(counts: np.ndarray, t: int) -> np.ndarray:
    """p_e = min(1, t / count_e); unseen entries get 1 (never used)."""
    return np.minimum(1.0, t / np.maximum(counts, 1))


def keep_probabilities(lists: pa.ListArray, probs: np.ndarray) -> np.ndarray:
    """P = 1 - prod(1 - p_e) per row, as -expm1(sum log1p(-p_e)) for accuracy; no match -> 0."""
    lengths = _lengths(lists)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    with np.errstate(divide="ignore"):  # p_e = 1 gives log(0) = -inf, i.e. P = 1
        log_miss = np.bincount(rows, weights=np.log1p(-probs[_values(lists)]), minlength=len(lengths))
    return -np.expm1(log_miss)


def uniform_draws(uids: Sequence[str | None], seed: int, keep_prob: np.ndarray | None = None) -> np.ndarray:
    """A uniform [0, 1) number per uid from a keyed hash of (seed, uid): layout-independent.

    Rows whose ``keep_prob`` is 0 or 1 are decided without a draw, so they skip the hash."""
    key = str(seed).encode()[:64]
    draws = np.zeros(len(uids), dtype=np.float64)
    todo = (
        range(len(uids)) if keep_prob is None else np.flatnonzero((keep_prob > 0) & (keep_prob < 1)).tolist()
    )
    for i in todo:
        digest = hashlib.blake2b((uids[i] or "").encode(), digest_size=8, key=key).digest()
        draws[i] = (int.from_bytes(digest, "little") >> 11) * 2.0**-53
    return draws


def _aligned_matches(shard: pa.Table, partial: pa.Table) -> pa.ListArray:
    """The partial's matched ids in the shard's row order (the executor may filter or reorder)."""
    lists = _combined(partial.column("matched_entries"))
    if partial.column(UID).equals(shard.column(UID)):
        return lists
    index = pc.index_in(shard.column(UID), value_set=partial.column(UID))
    if index.null_count:
        raise ValueError(
            f"balance: {index.null_count} rows of the shard are missing from its partial summary"
        )
    return lists.take(index)


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.type != MATCHED_ENTRIES_TYPE:
        array = array.cast(MATCHED_ENTRIES_TYPE)
    return array


def _values(lists: pa.ListArray) -> np.ndarray:
    return pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _lengths(lists: pa.ListArray) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
