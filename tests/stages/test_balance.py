"""MetaCLIP balancing as a pool stage: global counts, balanced sampling, layout independence."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import ahocorasick
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from pairsift.stages.balance import REASON_BALANCED_OUT, REASON_NO_MATCH, Balance, BalanceConfig, choose_t
from pairsift.stages.matching import metaclip_spacing
from pairsift.stages.metadata import Metadata, write_metadata


def make_pool(captions: list[str]) -> pa.Table:
    urls = [f"http://127.0.0.1:8000/{i}.jpg" for i in range(len(captions))]
    uids = [
        hashlib.blake2b(f"{u}\x00{c}".encode(), digest_size=16).hexdigest() for u, c in zip(urls, captions)
    ]
    return pa.table({"uid": uids, "url": urls, "caption": captions})


def run_balance(stage: Balance, pool: pa.Table, shard_size: int) -> tuple[pa.Table, dict]:
    """What the executor does: partial per shard, one fit, apply per shard with its own partial."""
    shards = [pool.slice(start, shard_size) for start in range(0, len(pool), shard_size)]
    partials = [stage.partial(shard) for shard in shards]
    fitted = stage.fit(partials)
    applied = [stage.apply(shard, fitted, part) for shard, part in zip(shards, partials)]
    return pa.concat_tables(applied), fitted


def metadata_file(tmp_path: Path, entries: list[str]) -> str:
    path = tmp_path / "metadata.parquet"
    write_metadata(Metadata(entries, ["test"] * len(entries)), path)
    return str(path)


def kept(out: pa.Table) -> np.ndarray:
    return np.array([r is None for r in out.column("reason").to_pylist()])


# ---- counts ---------------------------------------------------------------------------------------

SMALL_ENTRIES = [
    "dog",
    "cat",
    "hot dog",
    "New York",
    "red",
    "a",
    "Dog",
    "sat.",
    ",",
    "mat",
    "the cat",
    "zebra",
]


def test_counts_equal_brute_force(tmp_path: Path) -> None:
    rng = random.Random(1)
    words = ["dog", "cat", "hot", "New", "York", "red", "a", "Dog", "sat.", "the", "mat", ",", "on", "(cat)"]
    captions = [" ".join(rng.choices(words, k=rng.randint(0, 10))) for _ in range(2500)]
    stage = Balance(BalanceConfig(metadata=metadata_file(tmp_path, SMALL_ENTRIES), t=100))
    out, fitted = run_balance(stage, make_pool(captions), shard_size=300)

    matches = [[e for e in SMALL_ENTRIES if f" {e} " in metaclip_spacing(c)] for c in captions]
    brute = {e: sum(e in m for m in matches) for e in SMALL_ENTRIES}  # at most once per caption
    counts = dict(
        zip(fitted["counts"].column("entry").to_pylist(), fitted["counts"].column("count").to_pylist())
    )
    assert counts == brute
    assert brute["cat"] > 500 and brute["sat."] == 0 and brute[","] > 0  # the pool is not trivial
    assert fitted["counts"].column("source").to_pylist() == ["test"] * len(SMALL_ENTRIES)
    assert fitted["counts"].column("entry_id").to_pylist() == list(range(len(SMALL_ENTRIES)))

    total = sum(brute.values())
    head = [c for c in brute.values() if c > 100]
    assert fitted["total_matches"] == total
    assert fitted["n_head_entries"] == len(head)
    assert fitted["head_share"] == pytest.approx(sum(head) / total)
    assert fitted["n_matched_entries"] == sum(c > 0 for c in brute.values())
    assert fitted["n_captions"] == len(captions)
    assert fitted["n_captions_matched"] == sum(bool(m) for m in matches)
    assert fitted["distribution"].column("count_before").to_pylist() == sorted(
        (c for c in brute.values() if c), reverse=True
    )
    assert out.column("matched_entries").to_pylist() == [[SMALL_ENTRIES.index(e) for e in m] for m in matches]
    assert out.column("n_matches").to_pylist() == [len(m) for m in matches]


# ---- sampling -------------------------------------------------------------------------------------

CONCEPTS = [f"c{i}" for i in range(8)]
SINGLE_COUNTS = [6000, 3000, 1500, 800, 400, 200, 100, 50]
PAIRS = {("c0", "c1"): 1500, ("c0", "c6"): 600, ("c2", "c3"): 1000}
T = 300


@pytest.fixture(scope="module")
def sampling_pool() -> pa.Table:
    rng = random.Random(5)
    captions = [f"a photo of {c} on the grass" for c, n in zip(CONCEPTS, SINGLE_COUNTS) for _ in range(n)]
    captions += [f"{a} next to {b}" for (a, b), n in PAIRS.items() for _ in range(n)]
    captions += ["nothing to see here"] * 500
    rng.shuffle(captions)
    return make_pool(captions)


@pytest.fixture(scope="module")
def sampling_metadata(tmp_path_factory: pytest.TempPathFactory) -> str:
    return metadata_file(tmp_path_factory.mktemp("meta"), CONCEPTS)


@pytest.fixture(scope="module")
def balanced(sampling_pool: pa.Table, sampling_metadata: str) -> tuple[pa.Table, dict]:
    return run_balance(Balance(BalanceConfig(metadata=sampling_metadata, t=T, seed=11)), sampling_pool, 2000)


def true_counts() -> dict[str, int]:
    counts = dict(zip(CONCEPTS, SINGLE_COUNTS))
    for pair, n in PAIRS.items():
        for concept in pair:
            counts[concept] += n
    return counts


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def test_kept_fraction_single_entry(balanced: tuple[pa.Table, dict]) -> None:
    out, fitted = balanced
    counts = true_counts()
    is_kept = kept(out)
    captions = out.column("caption").to_pylist()
    for concept, n in zip(CONCEPTS, SINGLE_COUNTS):
        rows = np.array([c == f"a photo of {concept} on the grass" for c in captions])
        p = min(1.0, T / counts[concept])
        k = int(is_kept[rows].sum())
        assert within_binomial(k, n, p), (concept, k / n, p)
        assert np.allclose(out.column("keep_prob").to_numpy()[rows], p, rtol=1e-6)
    assert fitted["n_head_entries"] == sum(c > T for c in counts.values())


def test_kept_fraction_multi_entry(balanced: tuple[pa.Table, dict]) -> None:
    out, _ = balanced
    counts = true_counts()
    is_kept = kept(out)
    captions = out.column("caption").to_pylist()
    for (a, b), n in PAIRS.items():
        rows = np.array([c == f"{a} next to {b}" for c in captions])
        p = 1 - (1 - min(1.0, T / counts[a])) * (1 - min(1.0, T / counts[b]))
        assert within_binomial(int(is_kept[rows].sum()), n, p), (a, b, is_kept[rows].mean(), p)


def test_reasons_and_columns(balanced: tuple[pa.Table, dict]) -> None:
    out, fitted = balanced
    reasons = out.column("reason").to_pylist()
    no_match = np.array([c == "nothing to see here" for c in out.column("caption").to_pylist()])
    assert {reasons[i] for i in np.flatnonzero(no_match)} == {REASON_NO_MATCH}
    assert {reasons[i] for i in np.flatnonzero(~no_match)} == {None, REASON_BALANCED_OUT}
    assert out.column("n_matches").to_numpy()[no_match].max() == 0
    assert out.column("keep_prob").to_numpy()[no_match].max() == 0
    assert out.schema.field("matched_entries").type == pa.list_(pa.int32())
    assert out.column_names[:3] == ["uid", "url", "caption"]
    # expected kept pairs = sum of keep probabilities; the draw lands within 4 sigma of it
    probs = out.column("keep_prob").to_numpy().astype(np.float64)
    assert fitted["expected_kept"] == pytest.approx(probs.sum(), rel=1e-5)
    assert abs(kept(out).sum() - probs.sum()) < 4 * math.sqrt((probs * (1 - probs)).sum())


def test_expected_curve_caps_single_entries(tmp_path: Path) -> None:
    """On a pool where every caption has one entry, the expected count after is min(count, t)."""
    captions = [f"{c} here" for c, n in zip(CONCEPTS, SINGLE_COUNTS) for _ in range(n // 10)]
    stage = Balance(BalanceConfig(metadata=metadata_file(tmp_path, CONCEPTS), t=50))
    _, fitted = run_balance(stage, make_pool(captions), 1000)
    after = fitted["distribution"].column("expected_after").to_pylist()
    assert after == pytest.approx(sorted((min(n // 10, 50) for n in SINGLE_COUNTS), reverse=True))


def test_same_subset_for_any_shard_layout(
    sampling_pool: pa.Table, sampling_metadata: str, balanced: tuple[pa.Table, dict]
) -> None:
    out_a, _ = balanced
    other, _ = run_balance(
        Balance(BalanceConfig(metadata=sampling_metadata, t=T, seed=11)), sampling_pool, 777
    )
    uids = np.array(out_a.column("uid").to_pylist())
    assert other.column("uid").to_pylist() == out_a.column("uid").to_pylist()
    assert other.column("reason").to_pylist() == out_a.column("reason").to_pylist()
    assert other.column("keep_prob").equals(out_a.column("keep_prob"))
    # A different seed draws a different subset of about the same size.
    reseeded, _ = run_balance(
        Balance(BalanceConfig(metadata=sampling_metadata, t=T, seed=12)), sampling_pool, 2000
    )
    kept_a, kept_b = set(uids[kept(out_a)]), set(uids[kept(reseeded)])
    assert kept_a != kept_b
    assert abs(len(kept_a) - len(kept_b)) < 0.05 * len(kept_a)


def test_larger_t_keeps_a_superset(
    sampling_pool: pa.Table, sampling_metadata: str, balanced: tuple[pa.Table, dict]
) -> None:
    out_small, _ = balanced
    out_large, _ = run_balance(
        Balance(BalanceConfig(metadata=sampling_metadata, t=2 * T, seed=11)), sampling_pool, 2000
    )
    small, large = kept(out_small), kept(out_large)
    assert not (small & ~large).any()
    assert large.sum() > 1.5 * small.sum()


def test_choose_t_hits_a_target_size(sampling_pool: pa.Table, sampling_metadata: str) -> None:
    stage = Balance(BalanceConfig(metadata=sampling_metadata, t=T))
    partials = [stage.partial(sampling_pool.slice(s, 3000)) for s in range(0, len(sampling_pool), 3000)]
    n_entries = len(CONCEPTS)
    counts = true_counts()

    def expected_kept(t: int) -> float:  # closed form for this pool: singles + pairs
        p = {c: min(1.0, t / counts[c]) for c in CONCEPTS}
        singles = sum(n * p[c] for c, n in zip(CONCEPTS, SINGLE_COUNTS))
        return singles + sum(n * (1 - (1 - p[a]) * (1 - p[b])) for (a, b), n in PAIRS.items())

    for target in (2000.0, 5000.0, 9000.0):
        t = choose_t(partials, n_entries, target)
        assert expected_kept(t) >= target > expected_kept(t - 1)
    assert choose_t(partials, n_entries, 10**9) == max(counts.values())


def test_online_mode_keeps_matched_and_writes_keep_prob(
    sampling_pool: pa.Table, sampling_metadata: str
) -> None:
    out, _ = run_balance(
        Balance(BalanceConfig(metadata=sampling_metadata, t=T, online=True)), sampling_pool, 2000
    )
    counts = true_counts()
    matched = np.array([c != "nothing to see here" for c in out.column("caption").to_pylist()])
    assert np.array_equal(kept(out), matched)
    assert set(out.column("reason").to_pylist()) == {None, REASON_NO_MATCH}
    expected = []
    for ids in out.column("matched_entries").to_pylist():
        miss = 1.0
        for i in ids:
            miss *= 1 - min(1.0, T / counts[CONCEPTS[i]])
        expected.append(1 - miss if ids else 0.0)
    assert np.allclose(out.column("keep_prob").to_numpy(), expected, atol=1e-6)


def test_apply_aligns_partial_by_uid(tmp_path: Path) -> None:
    captions = ["dog", "cat", "a red dog", "nothing", "the cat sat"] * 20
    stage = Balance(BalanceConfig(metadata=metadata_file(tmp_path, SMALL_ENTRIES), t=5))
    shard = make_pool(captions)
    partial = stage.partial(shard)
    fitted = stage.fit([partial])
    expected = stage.apply(shard, fitted, partial)
    shuffled = partial.take(np.random.default_rng(0).permutation(len(partial)))
    assert stage.apply(shard, fitted, shuffled).equals(expected)
    assert stage(shard).equals(expected)  # in-process convenience path: fit on the one shard
    with pytest.raises(ValueError, match="missing from its partial"):
        stage.apply(shard, fitted, partial.slice(0, 50))


def test_config_validation(tmp_path: Path) -> None:
    path = metadata_file(tmp_path, ["dog"])
    assert BalanceConfig(metadata=path).t == 20_000
    with pytest.raises(ValidationError, match="plural_folding"):
        BalanceConfig(metadata=path, plural_folding=True)
    with pytest.raises(ValidationError, match="metadata file not found"):
        BalanceConfig(metadata=str(tmp_path / "nope.json"))
    with pytest.raises(ValidationError, match="greater than 0"):
        BalanceConfig(metadata=path, t=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        BalanceConfig(metadata=path, threshold=3)  # type: ignore[call-arg]
    assert Balance.stateful and Balance.name == "balance"


def test_normalized_mode_with_folding(tmp_path: Path) -> None:
    stage = Balance(
        BalanceConfig(
            metadata=metadata_file(tmp_path, ["dog", "hot dog"]),
            mode="normalized",
            plural_folding=True,
            t=1000,
        )
    )
    out = stage(make_pool(["Hot Dogs!", "DOG", "cat"]))
    assert out.column("matched_entries").to_pylist() == [[0, 1], [0], []]
    assert out.column("reason").to_pylist() == [None, None, REASON_NO_MATCH]


# ---- scale ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_500k_entry_metadata_builds_and_matches(tmp_path: Path) -> None:
    """A MetaCLIP-sized metadata (generated words; the real build gives ~365k) loads, builds and
    matches like the reference automaton."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(w) for w in letters[rng.integers(0, 26, size=(420_000, 6))]})
    multi = [f"{words[i]} {words[j]}" for i, j in rng.integers(0, 30_000, size=(90_000, 2))]
    entries = list(dict.fromkeys(words + multi))[:500_000]
    assert len(entries) == 500_000
    path = metadata_file(tmp_path, entries)
    stage = Balance(BalanceConfig(metadata=path, t=20))
    stage.setup()

    vocab = words[:30_000]
    picks = rng.integers(0, len(vocab), size=(20_000, 10))
    captions = [
        " ".join(vocab[j] for j in row) + (f" {multi[i]}." if i % 3 else ", ok")
        for i, row in enumerate(picks)
    ]
    out, fitted = run_balance(stage, make_pool(captions), 10_000)
    assert fitted["n_entries"] == 500_000

    automaton = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        automaton.add_word(f" {entry} ", i)
    automaton.make_automaton()
    sample = range(0, 20_000, 7)
    expected = [sorted({i for _, i in automaton.iter(metaclip_spacing(captions[r]))}) for r in sample]
    got = out.column("matched_entries").to_pylist()
    assert [got[r] for r in sample] == expected
    assert sum(len(got[r]) for r in sample) > 10 * len(sample)
    n_words = len(words)
    assert sum(any(i >= n_words for i in got[r]) for r in sample) > len(sample) / 2  # two-word entries


def test_relative_t_is_a_multiple_of_the_mean_entry_count(tmp_path):
    import pyarrow as pa

    from pairsift.stages.balance import Balance, BalanceConfig

    metadata = tmp_path / "m.txt"
    metadata.write_text("red circle\nblue square\ngreen star\n")
    captions = ["a red circle"] * 60 + ["a blue square"] * 30 + ["a green star"] * 6 + ["nothing here"] * 4
    shard = pa.table({"uid": [f"{i:032x}" for i in range(100)], "caption": captions})
    stage = Balance(BalanceConfig(metadata=str(metadata), t_relative=0.5))
    stage.setup()
    fitted = stage.fit([stage.partial(shard)])
    assert fitted["t"] == round(0.5 * (60 + 30 + 6) / 3)  # 16
    assert fitted["n_head_entries"] == 2
