"""Multi-index hashing finds exactly what comparing all pairs finds, for pHash- and PDQ-sized hashes."""

from __future__ import annotations

import numpy as np
import pytest

from pairsift.stages.hash_index import HashIndex, as_hash_rows, choose_chunks, popcount_rows


def planted(n: int, nbytes: int, radius: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes, and queries that are copies of some of them with 0..radius+2 bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    queries = []
    for row in rng.choice(n, 200, replace=False):
        bits = np.unpackbits(hashes[row])
        flip = rng.choice(bits.size, rng.integers(0, radius + 3), replace=False)
        bits[flip] ^= 1
        queries.append(np.packbits(bits))
    queries += list(rng.integers(0, 256, (50, nbytes), dtype=np.uint8))  # strangers
    return hashes, np.array(queries)


@pytest.mark.parametrize(("nbytes", "radius"), [(8, 8), (8, 4), (32, 31), (32, 10)])
def test_same_answers_as_all_pairs(nbytes, radius):
    hashes, queries = planted(8_000, nbytes, radius, seed=nbytes + radius)
    index = HashIndex(hashes, radius)
    for query in queries:
        distances = popcount_rows(hashes ^ query[None, :])
        want = sorted((int(d), int(r)) for r, d in enumerate(distances) if d <= radius)
        assert [(d, r) for r, d in index.within(query)] == want


def test_far_fewer_candidates_than_rows():
    hashes, queries = planted(50_000, 8, 8, seed=1)
    index = HashIndex(hashes, 8)
    mean = np.mean([len(index.candidates(q)) for q in queries])
    assert mean < 0.02 * len(hashes), mean


def test_chunking_rules_and_row_conversion():
    assert choose_chunks(64, 8) == 5 and choose_chunks(256, 31) == 16 and choose_chunks(64, 0) == 4
    rows = as_hash_rows([0xFFFF_0000_0000_0001, 1], 8)
    assert rows.shape == (2, 8) and rows[0, 0] == 0xFF and rows[1, 7] == 1
    assert as_hash_rows([b"\x01" * 32], 32).shape == (1, 32)
    with pytest.raises(ValueError):
        HashIndex(hashes=np.zeros((2, 8), np.uint8), radius=4).within(np.zeros(8, np.uint8), radius=9)
