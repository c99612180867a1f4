"""SemDeDup (Abbas et al., 2023) for ``dedup`` with ``method: semantic``, on CPU with numpy.

Spherical k-means over the L2-normalised ``image_embedding`` (``clip_score`` with
``store_embeddings``): centroids are fitted on a seeded sample of ``sample_size`` rows (drawn from
the pool sorted by uid, so the same on any shard layout), then every embedding is assigned to its
nearest centroid. Inside each cluster, a pair is a duplicate when its image cosine is above
``1 - eps`` (and, with ``text_eps``, its caption cosine above ``1 - text_eps`` too, so the same image
with two different true captions can be kept); pairs are computed in blocks, so a cluster of n rows
needs a block x n similarity matrix, not n x n. Groups are the connected components of those pairs
(the paper instead drops each row that has a nearer-to-centroid duplicate; components can chain and
drop a little more). Each group keeps its most prototypical row (highest cosine to the centroid) or,
with ``keep: clip_score``, the dedup keep rule.

Memory: the fit holds every embedding of the pool (fp16, 2 x dim bytes per row; twice that with
``text_eps``) plus uids and scores; spilling clusters to the run directory is not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pairsift.stages.dedup import SCORE, UnionFind, keeper, score_of

if TYPE_CHECKING:
    from pairsift.stages.dedup import DedupConfig

IMAGE_EMBEDDING, TEXT_EMBEDDING = "image_embedding", "text_embedding"
BLOCK = 2048  # rows per similarity block


def embedding_columns(cfg: DedupConfig) -> tuple[str, ...]:
    return (IMAGE_EMBEDDING, TEXT_EMBEDDING) if cfg.text_eps is not None else (IMAGE_EMBEDDING,)


def as_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<float16> rows (none NULL) as a float16 [rows, dim] matrix."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros((0, 0), np.float16)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float16).reshape(len(array), -1)


def kmeans(points: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means (cosine) on unit rows: k unit centroids, float32."""
    rng = np.random.default_rng(seed)
    centroids = points[rng.choice(len(points), k, replace=False)].astype(np.float32)
    for _ in range(iterations):
        labels = nearest(points, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, points.astype(np.float32))
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        filled = norms[:, 0] > 0  # an empty cluster keeps its old centroid
        centroids[filled] = sums[filled] / norms[filled]
    return centroids


def nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    labels = np.empty(len(points), np.int64)
    for start in range(0, len(points), BLOCK):
        block = points[start:start + BLOCK].astype(np.float32)
        labels[start:start + BLOCK] = (block @ centroids.T).argmax(axis=1)
    return labels


def close_pairs(images: np.ndarray, texts: np.ndarray | None, eps: float, text_eps: float | None):
    """Pairs (i < j) of one cluster's rows whose image (and caption) cosines pass the thresholds."""
    for start in range(0, len(images), BLOCK):
        close = images[start:start + BLOCK].astype(np.float32) @ images.astype(np.float32).T > 1 - eps
        if texts is not None and text_eps is not None:
            close &= texts[start:start + BLOCK].astype(np.float32) @ texts.astype(np.float32).T > 1 - text_eps
        for i, j in zip(*np.nonzero(close)):
            if j > start + i:
                yield start + int(i), int(j)


def semantic_groups(partials: Sequence[pa.Table], cfg: DedupConfig) -> list[tuple[str, list[str]]]:
    uids, scores, images, texts = _gather(partials, cfg.text_eps is not None)
    if not uids:
        return []
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(len(uids), min(cfg.sample_size, len(uids)), replace=False)
    centroids = kmeans(images[np.sort(sample)], min(cfg.clusters, len(sample)), cfg.iterations, cfg.seed)
    labels = nearest(images, centroids)
    groups = []
    for cluster in np.unique(labels):
        rows = np.flatnonzero(labels == cluster)
        sets = UnionFind(len(rows))
        for i, j in close_pairs(images[rows], None if texts is None else texts[rows], cfg.eps, cfg.text_eps):
            sets.union(i, j)
        closeness = images[rows].astype(np.float32) @ centroids[cluster]
        for component in sets.components().values():
            if len(component) < 2:
                continue
            members = [uids[rows[i]] for i in component]
            ranks = [float(closeness[i]) if cfg.keep == "prototypical" else scores[rows[i]] for i in component]
            groups.append((keeper(members, ranks), members))
    return groups


def _gather(partials: Sequence[pa.Table], with_text: bool):
    """Every row's uid, score and embeddings, in uid order (the same on any shard layout)."""
    uids: list[str] = []
    scores: list[float] = []
    images, texts = [], []
    for part in partials:
        uids += part.column("uid").to_pylist()
        scores += [score_of(s) for s in part.column(SCORE).to_pylist()]
        images.append(as_matrix(part.column(IMAGE_EMBEDDING)))
        if with_text:
            texts.append(as_matrix(part.column(TEXT_EMBEDDING)))
    if not uids:
        return [], [], None, None
    order = np.argsort(np.array(uids), kind="stable")
    image = np.concatenate([m for m in images if m.size])[order]
    text = np.concatenate([m for m in texts if m.size])[order] if with_text else None
    return [uids[i] for i in order], [scores[i] for i in order], image, text
