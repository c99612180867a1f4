"""Text filter: every reason, the order of checks, hostile captions, dedup, language ID, config."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pycld2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pairsift.stages import stage_class
from pairsift.stages.base import with_reason
from pairsift.stages.text_filter import (
    DEFAULT_BOILERPLATE,
    INVALID_CHARS,
    REASONS,
    TextFilter,
    TextFilterConfig,
    second_opinion,
)

EN = "A brown dog running on the beach at sunset"
ES = "Un perro marrón corriendo en la playa al atardecer con su dueño"
DE = "Ein brauner Hund läuft bei Sonnenuntergang am Strand entlang"
FR = "Un chien brun qui court sur la plage au coucher du soleil"


def run(captions: list, **cfg) -> pa.Table:
    """Filter ``captions`` (str, bytes or None) with dedup off unless the test asks for it."""
    cfg.setdefault("dedup", "none")
    if any(isinstance(c, bytes) for c in captions):
        column = pa.array([c.encode() if isinstance(c, str) else c for c in captions], pa.binary())
    else:
        column = pa.array(captions, pa.string())
    return TextFilter(TextFilterConfig(**cfg))(pa.table({"caption": column}))


def reasons(captions: list, **cfg) -> list[str | None]:
    return run(captions, **cfg).column("reason").to_pylist()


CASES = [
    # (caption, expected reason with the default config)
    (EN, None),
    ("Two cats sleeping on a red sofa", None),
    ("Image of a vintage car parked outside a diner", None),  # "image" inside a real caption is fine
    ("東京タワーと夜の街並み、美しい夜景", "language"),  # Japanese: cld2 is sure it is not English
    ("🐶🏖️🌅 dog on the beach at sunset", None),  # emoji are valid text
    (None, "empty_caption"),
    ("", "empty_caption"),
    ("   \t\n  ", "empty_caption"),
    ("\u3000\xa0\u2003", "empty_caption"),  # Unicode spaces only
    ("dog", "caption_too_short"),
    ("  dog  ", "caption_too_short"),  # measured after trimming
    ("dog " * 300, "caption_too_long"),
    ("x" * 1_000_000, "caption_too_long"),  # 1 MB
    ("\x00" * 1_000_000, "caption_too_long"),  # length is checked before the bytes are
    ("word " * 101, "too_many_words"),
    ("IMG_1234.jpg", "boilerplate"),
    ("DSC_0042.JPG", "boilerplate"),
    ("dscn0042", "boilerplate"),
    ("IMG-20190405-WA0003.jpeg", "boilerplate"),
    ("holiday photo 2019.png", "boilerplate"),
    ("/DCIM/100CANON/", "boilerplate"),
    ("Click here to enlarge", "boilerplate"),
    ("Click HERE", "boilerplate"),
    ("image", "boilerplate"),
    ("Image 12", "boilerplate"),
    ("Untitled", "boilerplate"),
    ("untitled-1", "boilerplate"),
    ("No image available", "boilerplate"),
    ("Product image coming soon", "boilerplate"),
    ("Download now for free", "boilerplate"),
    ("12345", "boilerplate"),
    ("2019-04-05 12:30", "boilerplate"),
    ("https://example.com/images/dog.jpg", "boilerplate"),
    ("www.example.com", "boilerplate"),
    ("example.com", "boilerplate"),
    (ES, "language"),
    (DE, "language"),
    (FR, "language"),
    ("A dog\x00 running on the beach", "invalid_text"),  # NUL byte
    ("A dog running\x07 on the beach", "invalid_text"),  # BEL
    ("A dog running on the \x85beach", "invalid_text"),  # C1 control
    ("A dog running on the beach \ufffe", "invalid_text"),  # noncharacter
    ("A dog running on the beach \U0010ffff", "invalid_text"),  # plane-16 noncharacter
    ("tabs\tand\nnewlines are fine in captions", None),
]


@pytest.mark.parametrize(("caption", "expected"), CASES, ids=lambda v: repr(v)[:40])
def test_each_reason_on_its_own(caption, expected):
    assert reasons([caption]) == [expected]


def test_word_limits():
    assert reasons(["one two three"], min_words=4) == ["too_few_words"]
    assert reasons(["one two three four"], min_words=4) == [None]
    assert reasons(["one two three four"], max_words=3) == ["too_many_words"]
    assert reasons(["one\u3000two\xa0three four"], max_words=3) == ["too_many_words"]  # Unicode spaces split


def test_char_limits_are_inclusive():
    assert reasons(["abcde", "abcd"], min_chars=5) == [None, "caption_too_short"]
    assert reasons(["a" * 30, "a" * 31], max_chars=30) == [None, "caption_too_long"]
    assert reasons(["ñandú" * 6], max_chars=30) == [None]  # characters, not bytes (60 bytes)
    assert reasons(["x" * 5000], max_chars=None) == [None]


def test_lone_surrogates_and_invalid_utf8_are_invalid_text():
    lone = "A dog on the beach \ud800 at sunset".encode("utf-8", "surrogatepass")
    assert reasons([lone, b"A dog on the beach \xff\xfe at noon", EN.encode(), b"\xff", None]) == [
        "invalid_text", "invalid_text", None, "caption_too_short", "empty_caption"]


def test_invalid_utf8_inside_a_string_column_is_found():
    # Arrow trusts whoever built the array; a parquet file from elsewhere can hold such bytes.
    column = pa.array([EN.encode(), b"caption \xed\xa0\x80 with a surrogate"], pa.binary()).view(pa.string())
    out = TextFilter(TextFilterConfig(dedup="none"))(pa.table({"caption": column}))
    assert out.column("reason").to_pylist() == [None, "invalid_text"]


def test_invalid_chars_are_exactly_what_cld2_refuses():
    """The vectorised pre-check must agree with cld2 on every code point: no caption reaches cld2
    only to make it raise, and no valid one is dropped."""
    points = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    ours = pc.match_substring_regex(pa.array([f"ab{chr(cp)}cd" for cp in points]), INVALID_CHARS)
    refused = np.zeros(len(points), dtype=bool)
    for i, cp in enumerate(points):
        try:
            pycld2.detect(f"ab{chr(cp)}cd".encode(), isPlainText=True)
        except pycld2.error:
            refused[i] = True
    assert refused.sum() == 127
    assert np.array_equal(ours.to_numpy(zero_copy_only=False), refused)


def test_first_failing_check_wins():
    table = pa.table({
        "caption": [None, "IMG_1.jpg" * 200, "IMG_1234.jpg " * 50, "Un perro en la playa al atardecer, click here", ES,
                    "Un perro\x00 en la playa con su dueño al atardecer", "hi\x00"],
        "dup_url_caption": [True, False, False, False, False, False, False],
    })
    out = TextFilter(TextFilterConfig(max_words=20))(table)
    assert out.column("reason").to_pylist() == [
        "duplicate", "caption_too_long", "too_many_words", "boilerplate", "language",
        "invalid_text",  # invalid text never reaches the language check: cld2 cannot read it
        "caption_too_short",
    ]


def test_rows_and_columns_are_kept_in_order():
    captions = [EN, None, ES, "IMG_0001.JPG", "Two cats on a sofa", "x" * 5000] * 50
    table = pa.table({
        "uid": [f"{i:032x}" for i in range(len(captions))],
        "url": [f"http://127.0.0.1/{i}.jpg" for i in range(len(captions))],
        "caption": captions,
        "dup_url_caption": [False] * len(captions),
    })
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=7))  # many chunks, as Ray hands them
    out = TextFilter(TextFilterConfig())(chunked)
    assert out.num_rows == table.num_rows
    assert out.select(table.column_names).equals(table)
    assert out.column_names == [*table.column_names, "language", "reason"]
    assert out.column("reason").to_pylist() == [None, "empty_caption", "language", "boilerplate", None,
                                                "caption_too_long"] * 50


def test_earlier_reason_is_kept():
    table = with_reason(pa.table({"caption": [ES, EN]}), ["timeout", None])
    out = TextFilter(TextFilterConfig(dedup="none"))(table)
    assert out.column("reason").to_pylist() == ["timeout", None]


@pytest.mark.parametrize(("dedup", "expected"), [
    ("url_caption", [None, None, "duplicate", None, "duplicate"]),
    ("url", [None, "duplicate", "duplicate", None, "duplicate"]),
    ("none", [None, None, None, None, None]),
])
def test_dedup_reads_ingest_flags(dedup, expected):
    table = pa.table({
        "caption": [EN, "A black cat on a windowsill", EN, EN, "A black cat on a windowsill"],
        "dup_url": [False, True, True, False, True],
        "dup_url_caption": [False, False, True, False, True],
    })
    assert TextFilter(TextFilterConfig(dedup=dedup))(table).column("reason").to_pylist() == expected


def test_dedup_with_real_ingest_keeps_first_occurrence_across_shards(tmp_path):
    from pairsift.stages.ingest import iter_input_shards

    urls = ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg", "http://127.0.0.1/a.jpg",
            "http://127.0.0.1/c.jpg", "http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"]
    captions = [EN, "Two cats on a red sofa", EN, EN, "A different caption for the same url", "Two cats"]
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "pool.parquet")
    shards = list(iter_input_shards(tmp_path / "pool.parquet", shard_size=2))
    assert len(shards) == 3
    by_pair = [r for s in shards for r in TextFilter(TextFilterConfig())(s).column("reason").to_pylist()]
    by_url = [r for s in shards for r in TextFilter(TextFilterConfig(dedup="url"))(s).column("reason").to_pylist()]
    assert by_pair == [None, None, "duplicate", None, None, None]
    assert by_url == [None, None, "duplicate", None, "duplicate", "duplicate"]


def test_missing_dup_column_is_one_clear_error():
    with pytest.raises(ValueError, match="dup_url_caption"):
        TextFilter(TextFilterConfig())(pa.table({"caption": [EN]}))
    null_flag = pa.table({"caption": [EN], "dup_url_caption": pa.array([None], pa.bool_())})
    assert TextFilter(TextFilterConfig())(null_flag).column("reason").to_pylist() == [None]


def test_language_detection():
    out = run([EN, ES, DE, FR, "hello", "IMG_1.jpg"], languages=["en", "es", "de", "fr"])
    assert out.column("language").to_pylist() == ["en", "es", "de", "fr", None, None]
    assert out.column("reason").to_pylist() == [None, None, None, None, None, "boilerplate"]


def test_language_choice():
    assert reasons([EN, ES, DE, FR], languages=["es"]) == ["language", None, "language", "language"]
    assert reasons([EN, ES, DE, FR], languages=["EN", "de"]) == [None, "language", None, "language"]
    assert reasons(["Hello there"], keep_unknown_language=True) == [None]  # cld2: not reliable
    assert reasons(["Hello there"], keep_unknown_language=False) == ["language"]


def test_no_language_filter_detects_nothing_but_still_checks_text():
    out = run([ES, "A dog\x00 on the beach"], languages=None)
    assert out.column("language").to_pylist() == [None, None]
    assert out.column("reason").to_pylist() == [None, "invalid_text"]


def test_repeated_captions_get_the_same_answer():
    captions = [ES, EN, ES, "Hello there", ES, EN] * 20
    out = run(captions)
    assert out.column("reason").to_pylist() == ["language", None, "language", None, "language", None] * 20
    assert out.column("language").to_pylist() == ["es", "en", "es", None, "es", "en"] * 20


@pytest.mark.parametrize("caption", [
    "Image of a cat", "A photo of 3 dogs", "Click beetle on a green leaf", "Downloading a file on a laptop",
    "2 kittens playing with yarn", "Logo design for a coffee shop", "Untitled painting by an unknown artist",
    "Red shoes, size 42", "The view from www dot com tower", "Portrait of a man in a blue hat",
])
def test_default_patterns_leave_real_captions_alone(caption):
    assert reasons([caption], languages=None) == [None]


def test_custom_patterns_are_case_insensitive_and_replace_the_defaults():
    assert reasons(["Stock Photo of a dog", "IMG_1234.jpg"], boilerplate_patterns=[r"stock photo"]) == [
        "boilerplate", None]
    assert reasons(["IMG_1234.jpg"], boilerplate_patterns=[]) == [None]


def test_other_caption_types():
    table = pa.table({"caption": pa.chunked_array([pa.array([EN, None], pa.large_string())])})
    assert TextFilter(TextFilterConfig(dedup="none"))(table).column("reason").to_pylist() == [None, "empty_caption"]
    nulls = pa.table({"caption": pa.nulls(3)})
    assert TextFilter(TextFilterConfig(dedup="none"))(nulls).column("reason").to_pylist() == ["empty_caption"] * 3
    empty = TextFilter(TextFilterConfig(dedup="none"))(pa.table({"caption": pa.array([], pa.string())}))
    assert empty.num_rows == 0 and empty.column_names == ["caption", "language", "reason"]
    with pytest.raises(ValueError, match="caption"):
        TextFilter(TextFilterConfig(dedup="none"))(pa.table({"text": [EN]}))


def test_config_validation():
    with pytest.raises(ValidationError, match="extra"):
        TextFilterConfig(min_char=3)
    with pytest.raises(ValidationError):
        TextFilterConfig(min_chars="many")
    with pytest.raises(ValidationError):
        TextFilterConfig(languages="en")
    with pytest.raises(ValidationError):
        TextFilterConfig(dedup="fuzzy")
    with pytest.raises(ValidationError, match="below min_chars"):
        TextFilterConfig(min_chars=10, max_chars=5)
    with pytest.raises(ValidationError, match="unknown language"):
        TextFilterConfig(languages=["english"])
    with pytest.raises(ValidationError, match="use null"):
        TextFilterConfig(languages=[])
    with pytest.raises(ValidationError, match=r"pattern \[1\].*RE2"):
        TextFilterConfig(boilerplate_patterns=["ok", r"(?<=a)b"])
    with pytest.raises(ValidationError):
        TextFilterConfig(min_words=-1)
    cfg = TextFilterConfig()
    with pytest.raises(ValidationError):
        cfg.min_chars = 3  # frozen


def test_registry_and_contract():
    assert stage_class("text_filter") is TextFilter
    assert TextFilter.config_class is TextFilterConfig
    assert "image" not in TextFilter(TextFilterConfig()).contract().reads
    assert set(REASONS) == {"duplicate", "empty_caption", "caption_too_short", "caption_too_long",
                            "too_few_words", "too_many_words", "boilerplate", "language", "invalid_text"}


# ---- the vectorised stage against a row-by-row reading of the same rules -------------------------

def reference_reason(caption: str | None, cfg: TextFilterConfig) -> str | None:
    """The rules as written in the stage's docstring, one row at a time, with Python's ``re``."""
    text = (caption or "").strip()
    if not text:
        return "empty_caption"
    if len(text) < cfg.min_chars:
        return "caption_too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "caption_too_long"
    words = len(text.split())
    if words < cfg.min_words:
        return "too_few_words"
    if cfg.max_words is not None and words > cfg.max_words:
        return "too_many_words"
    if any(re.search(p, text, re.IGNORECASE | re.ASCII) for p in cfg.boilerplate_patterns):
        return "boilerplate"
    try:
        reliable, _, details = pycld2.detect(text.encode(), isPlainText=True)
    except pycld2.error:
        return "invalid_text"
    code = details[0][1] if reliable and details[0][1] != "un" else None
    if code is None and cfg.second_opinion_min_confidence is not None and len(text.split()) >= 3:
        code = second_opinion(text.encode(), cfg.second_opinion_min_confidence)
    if code is None:
        return None if cfg.keep_unknown_language else "language"
    return None if code in cfg.languages else "language"


PIECES = ["dog", "the", "beach", "IMG_1234.jpg", "image", "click here", "12", "perro", "playa", "Hund",
          "über", "東京", "🐶", " ", "  ", "\t", "\n", "\u3000", "\x00", "\x1f", "\x85", "\ufffe", "www.", ".com",
          "https://", "untitled", "no image available", EN, ES, DE, FR]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=12).map("".join), min_size=1, max_size=20),
       st.integers(1, 12), st.integers(1, 6), st.booleans())
def test_matches_row_by_row_reference(captions, min_chars, min_words, keep_unknown):
    cfg = TextFilterConfig(min_chars=min_chars, max_chars=120, min_words=min_words, max_words=15,
                           keep_unknown_language=keep_unknown, dedup="none")
    got = TextFilter(cfg)(pa.table({"caption": pa.array(captions, pa.string())})).column("reason").to_pylist()
    assert got == [reference_reason(c, cfg) for c in captions]


def test_default_patterns_compile_in_python_re_too():
    # The reference above (and the benchmark's baseline) read the same patterns with Python's re.
    for pattern in DEFAULT_BOILERPLATE:
        re.compile(pattern, re.IGNORECASE | re.ASCII)
