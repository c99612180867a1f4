"""Image deduplication across the whole pool (``dedup``), one method per config.

* ``exact``: the same ``sha256`` of the downloaded bytes (download writes it).
* ``pixels``: the same ``pixel_sha256`` of the decoded pixels (``image_hashes``): a PNG re-save of a
  JPEG's pixels matches, a lossy re-encode does not.
* ``perceptual``: ``phash`` (or ``pdq``, skipping rows below ``min_pdq_quality``) within ``radius``
  bits. Candidate pairs come from multi-index hashing (``stages/hash_index.py``), never all pairs;
  groups are the connected components of the near-duplicate graph (union-find), so A~B~C is one
  group even when A and C are further apart than the radius.
* ``semantic``: SemDeDup (Abbas et al., 2023) over ``image_embedding`` (``stages/semdedup.py``).

Every group keeps one row and drops the rest with reason ``duplicate_image`` (``semantic_duplicate``
for semantic), ``duplicate_of`` = the kept uid (NULL on the kept row) and ``duplicate_group_size``
on every member (1 = no duplicate; NULL = the row had no hash/embedding and was not compared). The
kept row of an exact/pixels/perceptual group is the highest ``clip_score`` when the pool has that
column (rows without a score rank below scored ones), then the smallest uid: the same answer on any
shard or cluster layout.

As a pool stage: ``partial`` keeps (uid, key, clip_score) per shard, ``fit`` reads those one shard at a
time and writes the table ``duplicates`` (uid -> duplicate_of, group size; only rows in groups of two
or more), and ``apply`` looks up its shard's uids in it.

What the fit holds in the driver's memory (not yet bounded; the issue's distributed, spill-to-disk fit
that processes clusters on workers is NOT built):
* exact/pixels: one entry per distinct hash (its bytes, best uid and score, count): ~300 bytes per
  distinct image (Python objects; peak measured with tracemalloc in ``tests/stages/test_dedup.py``).
* perceptual: every distinct hash, its members' uids and scores, plus the hash index (one Python
  list entry per hash per chunk): ~0.9 KB per row for pHash, measured the same way.
* semantic: every embedding (fp16: 2 x dim bytes per row, twice with ``text_eps``) plus uid and score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pairsift.stages.base import Contract, PoolStage, StageConfig, with_reason
from pairsift.stages.hash_index import HashIndex, as_hash_rows

SCORE = "clip_score"
DUPLICATE_OF, GROUP_SIZE = "duplicate_of", "duplicate_group_size"
DUPLICATE_IMAGE, SEMANTIC_DUPLICATE = "duplicate_image", "semantic_duplicate"
KEY_OF = {"exact": "sha256", "pixels": "pixel_sha256"}
HASH_BYTES = {"phash": 8, "pdq": 32}
DEFAULT_RADIUS = {"phash": 8, "pdq": 31}  # pHash: the common <= 8 of 64; PDQ: its authors' 31 of 256
METHOD_OF_KEY = {"hash": "perceptual", "radius": "perceptual", "min_pdq_quality": "perceptual",
                 **dict.fromkeys(("eps", "text_eps", "clusters", "sample_size", "iterations", "seed", "keep"),
                                 "semantic")}


class DedupConfig(StageConfig):
    method: Literal["exact", "pixels", "perceptual", "semantic"]
    hash: Literal["phash", "pdq"] = Field("phash", description="perceptual: which image_hashes column")
    radius: int | None = Field(None, ge=0, description="perceptual: Hamming bits; None: 8 (pHash), 31 (PDQ)")
    eps: float = Field(0.05, gt=0, lt=2, description="semantic: duplicate when image cosine > 1 - eps")
    text_eps: float | None = Field(None, gt=0, lt=2,
                                   description="semantic: also require caption cosine > 1 - text_eps")
    clusters: int = Field(64, ge=1, description="semantic: k-means clusters")
    sample_size: int = Field(100_000, ge=1, description="semantic: embeddings the centroids are fitted on")
    iterations: int = Field(25, ge=1, description="semantic: k-means iterations")
    seed: int = Field(0, description="semantic: sample and initial centroids")
    keep: Literal["prototypical", "clip_score"] = Field(
        "prototypical", description="semantic: keep the row closest to its centroid, or the best clip_score")
    min_pdq_quality: int = Field(50, ge=0, le=100,
                                 description="pdq: rows with a lower pdq_quality (flat images) are not compared")

    @model_validator(mode="after")
    def _check(self) -> DedupConfig:
        # a non-default value, not "was given": workers rebuild the config from its full dump
        for key, method in METHOD_OF_KEY.items():
            if method != self.method and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key} applies to method {method} only, not {self.method}")
        if self.radius is not None and self.radius > HASH_BYTES[self.hash] * 8:
            raise ValueError(f"radius {self.radius} exceeds the {HASH_BYTES[self.hash] * 8} bits of {self.hash}")
        return self

    @property
    def hamming_radius(self) -> int:
        return DEFAULT_RADIUS[self.hash] if self.radius is None else self.radius


class Dedup(PoolStage):
    """Drop all but one image of each duplicate group, recording which one was kept."""

    name: ClassVar[str] = "dedup"
    config_class: ClassVar[type[StageConfig]] = DedupConfig
    cfg: DedupConfig

    def key_columns(self) -> tuple[str, ...]:
        if self.cfg.method in KEY_OF:
            return (KEY_OF[self.cfg.method],)
        if self.cfg.method == "perceptual":
            return (self.cfg.hash, "pdq_quality") if self.cfg.hash == "pdq" else (self.cfg.hash,)
        from pairsift.stages.semdedup import embedding_columns

        return embedding_columns(self.cfg)

    def contract(self) -> Contract:
        reason = SEMANTIC_DUPLICATE if self.cfg.method == "semantic" else DUPLICATE_IMAGE
        return Contract(reads=self.key_columns(), optional=(SCORE,), reasons=(reason,),
                        writes={DUPLICATE_OF: pa.string(), GROUP_SIZE: pa.int32()})

    def partial(self, shard: pa.Table) -> pa.Table:
        keys = self.key_columns()
        scores = shard.column(SCORE) if SCORE in shard.column_names else pa.nulls(shard.num_rows, pa.float32())
        summary = pa.table({"uid": shard.column("uid"), **{k: shard.column(k) for k in keys},
                            SCORE: pc.cast(scores, pa.float32())})
        compared = pc.is_valid(summary.column(keys[0]))
        if "pdq_quality" in keys:  # PDQ's authors: hashes of quality below 50 (flat images) match noise
            compared = pc.and_(compared, pc.greater_equal(summary.column("pdq_quality"), self.cfg.min_pdq_quality))
        return summary.filter(compared)

    def fit(self, partials: Sequence[pa.Table]) -> dict[str, Any]:
        if self.cfg.method in KEY_OF:
            groups = exact_groups(partials, KEY_OF[self.cfg.method])
        elif self.cfg.method == "perceptual":
            groups = perceptual_groups(partials, self.cfg.hash, self.cfg.hamming_radius)
        else:
            from pairsift.stages.semdedup import semantic_groups

            groups = semantic_groups(partials, self.cfg)
        table = duplicates_table(groups)
        dropped = int(pc.sum(pc.is_valid(table.column(DUPLICATE_OF))).as_py() or 0)
        return {"duplicates": table, "groups": len(groups), "dropped": dropped}

    def apply(self, shard: pa.Table, fitted: dict[str, Any], partial: pa.Table) -> pa.Table:
        table: pa.Table = fitted["duplicates"]
        found = pc.index_in(shard.column("uid"), value_set=table.column("uid"))
        duplicate_of = pc.take(table.column(DUPLICATE_OF), found)
        # a compared row that is in no group is a group of one; a row without a key was not compared
        compared = pc.is_in(shard.column("uid"), value_set=partial.column("uid"))
        size = pc.if_else(compared, pc.coalesce(pc.take(table.column(GROUP_SIZE), found), pa.scalar(1, pa.int32())),
                          pa.scalar(None, pa.int32()))
        reason = self.contract().reasons[0]
        shard = shard.append_column(DUPLICATE_OF, duplicate_of).append_column(GROUP_SIZE, size)
        return with_reason(shard, [None if d is None else reason for d in duplicate_of.to_pylist()])


# ---------------------------------------------------------------------------- the keep rule, groups


def score_of(value: float | None) -> float:
    """A score for ranking: a missing or NaN score ranks below every real one."""
    return -math.inf if value is None or math.isnan(value) else value


def prefer(score: float, uid: str, best_score: float, best_uid: str) -> bool:
    """The keep rule: the higher score, then the smaller uid."""
    return score > best_score or (score == best_score and uid < best_uid)


def keeper(uids: list[str], scores: list[float]) -> str:
    best = 0
    for i in range(1, len(uids)):
        if prefer(scores[i], uids[i], scores[best], uids[best]):
            best = i
    return uids[best]


def duplicates_table(groups: Iterable[tuple[str, list[str]]]) -> pa.Table:
    """(kept uid, members including it) -> one row per member: duplicate_of (NULL on the kept one)
    and the group's size, sorted by uid so the stored fit is the same on any layout."""
    rows = sorted((uid, None if uid == kept else kept, len(members)) for kept, members in groups for uid in members)
    return pa.table({"uid": pa.array([r[0] for r in rows], pa.string()),
                     DUPLICATE_OF: pa.array([r[1] for r in rows], pa.string()),
                     GROUP_SIZE: pa.array([r[2] for r in rows], pa.int32())})


def exact_groups(partials: Sequence[pa.Table], column: str) -> list[tuple[str, list[str]]]:
    """Groups of rows with the same hex digest: one pass for the best row and count per digest, a
    second (partials re-read one at a time) to list the members of groups of two or more."""
    best: dict[bytes, list] = {}  # digest -> [score, uid, count]
    for part in partials:
        for key, uid, score in _rows(part, column):
            entry = best.get(key)
            if entry is None:
                best[key] = [score, uid, 1]
                continue
            entry[2] += 1
            if prefer(score, uid, entry[0], entry[1]):
                entry[0], entry[1] = score, uid
    members: dict[bytes, list[str]] = {}
    for part in partials:
        for key, uid, _ in _rows(part, column):
            if best[key][2] > 1:
                members.setdefault(key, []).append(uid)
    return [(best[key][1], uids) for key, uids in members.items()]


def _rows(part: pa.Table, column: str):
    scores = part.column(SCORE).to_pylist()
    for key, uid, score in zip(part.column(column).to_pylist(), part.column("uid").to_pylist(), scores):
        yield bytes.fromhex(key), uid, score_of(score)


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def near_pairs(hashes: np.ndarray, radius: int) -> Iterable[tuple[int, int]]:
    """Pairs (i < j) of rows within ``radius`` bits, from the multi-index (not all pairs)."""
    index = HashIndex(hashes, radius)
    for i in range(len(hashes)):
        for j, _ in index.within(hashes[i]):
            if j > i:
                yield i, j


def perceptual_groups(partials: Sequence[pa.Table], column: str, radius: int) -> list[tuple[str, list[str]]]:
    """Connected components of the near-duplicate graph over the distinct hashes."""
    members: dict[bytes, list[tuple[str, float]]] = {}  # identical hashes are compared once
    for part in partials:
        rows = as_hash_rows(part.column(column).to_pylist(), HASH_BYTES[column])
        for row, uid, score in zip(rows, part.column("uid").to_pylist(), part.column(SCORE).to_pylist()):
            members.setdefault(row.tobytes(), []).append((uid, score_of(score)))
    keys = sorted(members)
    hashes = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, HASH_BYTES[column])
    sets = UnionFind(len(keys))
    for i, j in near_pairs(hashes, radius):
        sets.union(i, j)
    groups = []
    for component in sets.components().values():
        rows = [m for i in component for m in members[keys[i]]]
        if len(rows) > 1:
            uids = [uid for uid, _ in rows]
            groups.append((keeper(uids, [score for _, score in rows]), uids))
    return groups
