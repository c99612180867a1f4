"""Caption-to-entry matching: MetaCLIP's exact rule and our normalized mode."""

from __future__ import annotations

import random

import ahocorasick
import pyarrow as pa
import pytest

from pairsift.stages.matching import Matcher, fold_plural, metaclip_spacing, normalized_tokens

METACLIP_ENTRIES = [
    "dog",  # 0
    "Dog",  # 1
    "hot-dog",  # 2
    "hot dog",  # 3
    "Mr.",  # 4: contains "." -> can never match
    "dog.",  # 5: likewise
    "(dog)",  # 6
    "a",  # 7
    "New York",  # 8
    "York",  # 9
    ",",  # 10: a bare comma entry matches any caption with a comma
    "dog  cat",  # 11: two spaces
    "cat",  # 12
    "café",  # 13
    "cat dog",  # 14
    "e.g",  # 15: never matches
    "U.S",  # 16: never matches
]

METACLIP_CASES = [
    ("a dog", {"a", "dog"}),
    ("Dog days", {"Dog"}),
    ("DOG", set()),
    ("(dog)", {"(dog)"}),
    ("the (dog) sat", {"(dog)"}),
    ("hot-dog stand", {"hot-dog"}),
    ("hot dog", {"hot dog", "dog"}),
    ("Mr. Smith", set()),
    ("dog.", {"dog"}),
    ("dog,cat", {"dog", "cat", ","}),
    ("dog!cat?", {"dog", "cat"}),
    ("dog;cat:", {"dog", "cat"}),
    ("dog`cat", {"dog", "cat"}),
    ("dog\tcat", {"dog", "cat"}),
    ("dog\ncat\r", {"dog", "cat"}),
    ("dog  cat", {"dog", "cat", "dog  cat"}),
    ("cat dog", {"cat", "dog", "cat dog"}),
    ("dogs", set()),
    ("New York City", {"New York", "York"}),
    ("new york", set()),
    ("e.g. a café", {"a", "café"}),
    ("U.S.", set()),
    ("dog dog dog", {"dog"}),
    ("", set()),
    ("   ", set()),
]


def brute_force(entries: list[str], caption: str) -> list[int]:
    """MetaCLIP's definition, literally: entry i matches iff " e " occurs in the spaced caption."""
    spaced = metaclip_spacing(caption)
    return [i for i, e in enumerate(entries) if f" {e} " in spaced]


def reference_automaton(entries: list[str]) -> ahocorasick.Automaton:
    automaton = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        automaton.add_word(f" {entry} ", i)
    automaton.make_automaton()
    return automaton


@pytest.fixture(scope="module")
def metaclip_matcher() -> Matcher:
    return Matcher(METACLIP_ENTRIES, "metaclip")


@pytest.mark.parametrize(("caption", "expected"), METACLIP_CASES)
def test_metaclip_cases(metaclip_matcher: Matcher, caption: str, expected: set[str]) -> None:
    (ids,) = metaclip_matcher.match([caption]).to_pylist()
    assert {METACLIP_ENTRIES[i] for i in ids} == expected
    assert ids == brute_force(METACLIP_ENTRIES, caption)  # ascending, distinct, same as the definition


def test_metaclip_null_caption_and_shape(metaclip_matcher: Matcher) -> None:
    out = metaclip_matcher.match(pa.chunked_array([["a dog", None], ["cat"]]))
    assert out.type == pa.list_(pa.int32())
    assert out.to_pylist() == [[0, 7], [], [12]]


def _random_text(rng: random.Random, alphabet: list[str], n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_metaclip_equals_brute_force_on_random_text() -> None:
    """Random entries and captions over a tiny alphabet full of separators: every quirk of the
    reference rule (empty tokens, punctuation entries, whitespace) is hit many times."""
    rng = random.Random(7)
    alphabet = ["a", "b", "A", " ", " ", ",", ".", "!", "\t", "\n", "-", "(", "é", "ab"]
    entries = sorted({_random_text(rng, alphabet, rng.randint(1, 4)) for _ in range(400)})
    entries += ["", "a", "a"]  # empty entry and a repeated one
    captions = [_random_text(rng, alphabet, rng.randint(0, 30)) for _ in range(3000)]
    got = Matcher(entries, "metaclip").match(captions).to_pylist()
    automaton = reference_automaton(entries)  # repeated strings: the automaton keeps the last id
    expected = [sorted({i for _, i in automaton.iter(metaclip_spacing(c))}) for c in captions]
    assert got == expected
    brute = [brute_force(entries, c) for c in captions[:300]]
    last_a = len(entries) - 1
    brute = [[i for i in ids if entries[i] != "a" or i == last_a] for ids in brute]
    assert got[:300] == brute
    assert sum(map(len, got)) > 3000  # the case is not vacuous


NORMALIZED_ENTRIES = [
    "dog",  # 0
    "Dog",  # 1: same tokens as "dog" in normalized mode: both match together
    "hot dog",  # 2
    "hot-dog",  # 3
    "U.S.",  # 4
    "New York",  # 5
    "café",  # 6
    "box",  # 7
    "berry",  # 8
    "dog's",  # 9: with plural folding this is "dog" too
    "rock & roll",  # 10
]

NORMALIZED_CASES = [
    # caption, ids without plural folding, ids with plural folding
    ("DOG", {0, 1}, {0, 1, 9}),
    ("(dog)", {0, 1}, {0, 1, 9}),
    ("a dog.", {0, 1}, {0, 1, 9}),
    ("hot dog", {0, 1, 2}, {0, 1, 2, 9}),
    ("hot, dog", {0, 1}, {0, 1, 9}),  # punctuation breaks a phrase
    ("hot-dog", {3}, {3}),  # the inner hyphen keeps one word
    ("Hot–dog", {0, 1}, {0, 1, 9}),  # an en dash is punctuation, not a hyphen
    ("the U.S. army", {4}, {4}),
    ("us army", set(), set()),
    ("NEW\tYORK", {5}, {5}),
    ("ＤＯＧ", {0, 1}, {0, 1, 9}),  # full-width letters: NFKC
    ("CAFÉ", {6}, {6}),
    ("cafe\u0301", {6}, {6}),  # decomposed accent: NFKC composes it
    ("dogs", set(), {0, 1, 9}),
    ("dog’s bowl", {9}, {0, 1, 9}),  # typographic apostrophe is an apostrophe
    ("boxes", set(), {7}),
    ("berries", set(), {8}),
    ("hot dogs", set(), {0, 1, 2, 9}),
    ("rock&roll", {10}, {10}),
    ("", set(), set()),
]


@pytest.mark.parametrize(("caption", "plain", "folded"), NORMALIZED_CASES)
def test_normalized_cases(caption: str, plain: set[int], folded: set[int]) -> None:
    assert set(Matcher(NORMALIZED_ENTRIES, "normalized").match([caption]).to_pylist()[0]) == plain
    with_folding = Matcher(NORMALIZED_ENTRIES, "normalized", plural_folding=True)
    assert set(with_folding.match([caption]).to_pylist()[0]) == folded


def test_normalized_equals_token_brute_force() -> None:
    """Normalized matching = the entry's tokens occur as a contiguous run of the caption's tokens."""
    rng = random.Random(3)
    words = ["Dog", "dogs", "cat", "hot-dog", "U.S.", "a", "b's", "(x)", "É", "ﬁsh"]
    entries = sorted({" ".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(200)})
    captions = [" ".join(rng.choices(words + [",", ";", "  "], k=rng.randint(0, 12))) for _ in range(1500)]
    for folding in (False, True):
        got = Matcher(entries, "normalized", plural_folding=folding).match(captions).to_pylist()
        entry_tokens = [normalized_tokens(e, folding) for e in entries]
        for caption, ids in zip(captions, got):
            tokens = normalized_tokens(caption, folding)
            runs = {tuple(tokens[i:j]) for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1)}
            assert ids == [i for i, toks in enumerate(entry_tokens) if toks and tuple(toks) in runs]


@pytest.mark.parametrize(
    ("word", "singular"),
    [
        ("dogs", "dog"),
        ("boxes", "box"),
        ("churches", "church"),
        ("berries", "berry"),
        ("glass", "glass"),
        ("bus", "bus"),
        ("virus", "virus"),
        ("analysis", "analysis"),
        ("gas", "gas"),
        ("dog's", "dog"),
        ("dogs'", "dog"),
        ("shoes", "shoe"),
        ("classes", "class"),
    ],
)
def test_fold_plural(word: str, singular: str) -> None:
    assert fold_plural(word) == singular


def test_bad_mode_and_folding_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        Matcher(["dog"], "fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plural_folding"):
        Matcher(["dog"], "metaclip", plural_folding=True)
