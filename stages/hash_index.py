"""Near-neighbour search over perceptual hashes by Hamming distance, without comparing all pairs.

Multi-index hashing (Norouzi et al., 2012): cut each ``bits``-bit hash into ``m`` chunks. If two
hashes differ in at most ``r`` bits, at least one chunk differs in at most ``r // m`` bits (pigeonhole),
so it is enough to look up, per chunk, every value within ``r // m`` bits of the query's chunk, and
then check the full distance of those candidates only. ``m`` is chosen so that chunks are 16 bits or
less (lookups stay cheap) and ``r // m`` is 0 or 1 (few probes): 64-bit pHash at r = 8 uses 5
chunks of 12-13 bits, 256-bit PDQ at r = 31 uses 16 chunks of 16 bits, each probed within 1 bit.

Hashes are numpy arrays of uint8 bytes, one row per hash (8 bytes for pHash, 32 for PDQ).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np


def _chunk_bounds(bits: int, chunks: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, bits, chunks + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def choose_chunks(bits: int, radius: int) -> int:
    """The fewest chunks that are at most 16 bits wide and need probing within at most 1 bit."""
    chunks = -(-bits // 16)
    while radius // chunks > 1:
        chunks += 1
    return min(chunks, bits)


def popcount_rows(xor: np.ndarray) -> np.ndarray:
    return np.unpackbits(xor, axis=1).sum(axis=1)


class HashIndex:
    """Hashes (rows of bytes) indexed for ``within(query, radius)`` lookups."""

    def __init__(self, hashes: np.ndarray, radius: int):
        hashes = np.ascontiguousarray(hashes, dtype=np.uint8)
        if hashes.ndim != 2:
            raise ValueError("hashes must be a 2-d uint8 array, one row per hash")
        self.hashes, self.radius = hashes, radius
        self.bits = hashes.shape[1] * 8
        self.chunks = choose_chunks(self.bits, radius)
        self.bounds = _chunk_bounds(self.bits, self.chunks)
        self.chunk_radius = radius // self.chunks
        unpacked = np.unpackbits(hashes, axis=1)
        self.tables: list[dict[int, list[int]]] = []
        for start, end in self.bounds:
            table: dict[int, list[int]] = defaultdict(list)
            for row, key in enumerate(_keys(unpacked[:, start:end]).tolist()):
                table[key].append(row)
            self.tables.append(table)
        self.flips = [_flip_masks(end - start, self.chunk_radius) for start, end in self.bounds]

    def candidates(self, query: np.ndarray) -> set[int]:
        bits = np.unpackbits(np.asarray(query, np.uint8))
        found: set[int] = set()
        for (start, end), table, flips in zip(self.bounds, self.tables, self.flips):
            key = int(_keys(bits[None, start:end])[0])
            for flip in flips:
                found.update(table.get(key ^ flip, ()))
        return found

    def within(self, query: np.ndarray, radius: int | None = None) -> list[tuple[int, int]]:
        """(row, distance) of every indexed hash within ``radius`` bits of ``query`` (radius <= the
        index's), nearest first, then by row."""
        radius = self.radius if radius is None else radius
        if radius > self.radius:
            raise ValueError(f"radius {radius} exceeds the index's {self.radius}")
        rows = np.fromiter(self.candidates(query), dtype=np.int64)
        if rows.size == 0:
            return []
        distances = popcount_rows(self.hashes[rows] ^ np.asarray(query, np.uint8)[None, :])
        hits = sorted(zip(distances.tolist(), rows.tolist()))
        return [(row, distance) for distance, row in hits if distance <= radius]


def _keys(bits: np.ndarray) -> np.ndarray:
    """Each row of 0/1 bits as an integer."""
    weights = (1 << np.arange(bits.shape[1] - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def _flip_masks(width: int, radius: int) -> list[int]:
    """Every mask of at most ``radius`` set bits within ``width`` bits (0 first)."""
    masks = [0]
    for r in range(1, radius + 1):
        for positions in itertools.combinations(range(width), r):
            masks.append(sum(1 << (width - 1 - p) for p in positions))
    return masks


def as_hash_rows(values: list, nbytes: int) -> np.ndarray:
    """pHash ints (uint64) or PDQ bytes as rows of ``nbytes`` bytes, big-endian."""
    if not values:
        return np.zeros((0, nbytes), np.uint8)
    raw = b"".join(v.to_bytes(nbytes, "big") if isinstance(v, int) else bytes(v) for v in values)
    return np.frombuffer(raw, np.uint8).reshape(-1, nbytes)
