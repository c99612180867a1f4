"""Metadata: building from WordNet + wordfreq, and loading the formats users bring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairsift.stages.metadata import (
    DEFAULT_WORDNET_DIR,
    Metadata,
    build_metadata,
    frequent_unigrams,
    gloss_bigrams,
    load_metadata,
    merge_sources,
    wordnet_glosses,
    wordnet_lemmas,
    write_metadata,
)

# Lines in WordNet 3.0's data-file format: offset lex_filenum ss_type w_cnt(hex) [word lex_id]... | gloss
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked all night"
07697100 13 n 02 hotdog 0 hot_dog 0 000 | a frankfurter served hot on a bun; "a hot dog stand"
"""
DATA_VERB = """\
  1 This software and database is being provided to you, the LICENSEE, by
01047745 32 v 01 bark 0 000 | speak in an unfriendly tone; "the dog barked"
"""
DATA_ADJ = """\
00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance
00020103 00 s 0b outback(a) 0 remote 0 a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 dog 0 003 | inaccessible
"""
DATA_ADV = """\
00001740 02 r 01 hot 0 000 | with great heat; "the dog barked"
"""


@pytest.fixture
def wordnet_dir(tmp_path: Path) -> Path:
    root = tmp_path / "wordnet"
    root.mkdir()
    for pos, text in (("noun", DATA_NOUN), ("verb", DATA_VERB), ("adj", DATA_ADJ), ("adv", DATA_ADV)):
        (root / f"data.{pos}").write_text(text)
    return root


def test_wordnet_lemmas_parse_the_data_format(wordnet_dir: Path) -> None:
    lemmas = wordnet_lemmas(wordnet_dir)
    assert lemmas == [
        "dog",
        "domestic dog",
        "Canis familiaris",
        "hotdog",
        "hot dog",
        "bark",
        "abounding",
        "galore",
        "outback",
        "remote",
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
        "g",
        "h",
        "hot",
    ]  # hex word count (0b = 11), adjective markers stripped, duplicates ("dog") kept once


def test_wordnet_glosses(wordnet_dir: Path) -> None:
    glosses = list(wordnet_glosses(wordnet_dir))
    assert glosses[0] == 'a member of the genus Canis; "the dog barked all night"'
    assert len(glosses) == 6


def test_missing_wordnet_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="wordnet-base") as err:
        wordnet_lemmas(tmp_path)
    assert "\n" not in str(err.value)


def test_gloss_bigrams_rank_by_pmi() -> None:
    glosses = ["red fox; red fox", "red fox", "red car", "blue car", "blue car", "blue sky, blue sky"]
    # counts: red 4, fox 3, car 3, blue 4, sky 2 (N = 16); pairs: red fox 3, red car 1, blue car 2,
    # blue sky 2. PMI: red fox = blue sky = log 4 (tie: higher count first), blue car log 8/3, red car log 4/3
    assert gloss_bigrams(glosses, n=10, min_count=1, min_pmi=0.0) == [
        "red fox",
        "blue sky",
        "blue car",
        "red car",
    ]
    assert gloss_bigrams(glosses, n=10, min_count=2, min_pmi=0.0) == ["red fox", "blue sky", "blue car"]
    assert gloss_bigrams(glosses, n=10, min_count=1, min_pmi=math.log(2)) == [
        "red fox",
        "blue sky",
        "blue car",
    ]
    assert gloss_bigrams(glosses, n=1, min_count=1, min_pmi=0.0) == ["red fox"]
    assert gloss_bigrams(glosses, n=10, min_count=1, min_pmi=0.0, stopwords=frozenset({"blue"})) == [
        "red fox",
        "red car",
    ]


def test_frequent_unigrams_are_words() -> None:
    words = frequent_unigrams(2000)
    assert len(words) == 2000 and len(set(words)) == 2000
    assert words[:3] == ["the", "to", "and"]  # wordfreq's frequency order
    assert all(w.replace("-", "").replace("'", "").isalpha() for w in words)


def test_merge_sources_dedups_and_records_every_source() -> None:
    merged = merge_sources([("wordnet", ["dog", "cat", "dog"]), ("wordfreq_unigram", ["the", "dog"])])
    assert merged.entries == ["dog", "cat", "the"]
    assert merged.sources == ["wordnet+wordfreq_unigram", "wordnet", "wordfreq_unigram"]


def test_build_metadata_from_fixture(wordnet_dir: Path, tmp_path: Path) -> None:
    summary = build_metadata(tmp_path / "m.parquet", wordnet_dir=wordnet_dir, n_unigrams=3000, n_bigrams=0)
    loaded = load_metadata(tmp_path / "m.parquet")
    assert summary.n_entries == len(loaded) == len(set(loaded.entries))
    assert loaded.entries[:5] == ["dog", "domestic dog", "Canis familiaris", "hotdog", "hot dog"]
    source = dict(zip(loaded.entries, loaded.sources))
    assert source["dog"] == "wordnet+wordfreq_unigram" and source["the"] == "wordfreq_unigram"
    assert source["Canis familiaris"] == "wordnet"
    assert sum(summary.by_source.values()) == summary.n_entries
    assert summary.by_source["wordnet"] == 19


@pytest.mark.parametrize("name", ["m.txt", "m.json", "m.parquet"])
def test_a_link_planted_at_the_old_temp_name_is_not_followed(tmp_path: Path, name: str) -> None:
    """In a shared directory anyone can plant ``.m.txt.tmp`` (the old fixed temp name) pointing at a
    file of ours; writing the metadata must neither write through it nor leave a temp file behind."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = tmp_path / f".{name}.tmp"
    planted.symlink_to(victim)
    write_metadata(merge_sources([("wordnet", ["dog", "cat"])]), tmp_path / name)
    assert victim.read_text() == "precious" and planted.is_symlink()
    assert load_metadata(tmp_path / name).entries == ["dog", "cat"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "victim", planted.name])


@pytest.mark.skipif(
    not (DEFAULT_WORDNET_DIR / "data.noun").is_file(),
    reason="Debian wordnet-base not installed (make setup installs it)",
)
def test_build_real_metadata(tmp_path: Path) -> None:
    summary = build_metadata(tmp_path / "metadata.json", n_unigrams=20_000, n_bigrams=2_000)
    loaded = load_metadata(tmp_path / "metadata.json")
    assert len(loaded) == summary.n_entries == len(set(loaded.entries))
    assert summary.by_source["wordnet"] > 140_000  # WordNet 3.0 has 147k distinct lemma names
    assert summary.by_source["wordnet_gloss_bigram"] > 500
    source = dict(zip(loaded.entries, loaded.sources))
    assert source["hot dog"].startswith("wordnet")
    assert source["New York"] == "wordnet"
    assert "wordfreq_unigram" in source["dog"] and "wordnet" in source["dog"]
    assert not any("_" in e for e, s in source.items() if s == "wordnet")
    assert all(s.split("+")[0] in summary.by_source for s in source.values())


def test_load_formats(tmp_path: Path) -> None:
    entries = ["dog", "hot dog", "Mr. Smith", " spaced "]
    (tmp_path / "metaclip.json").write_text(json.dumps(entries))
    (tmp_path / "lines.txt").write_text("dog\nhot dog\n\nMr. Smith\r\n spaced \n")
    write_metadata(Metadata(entries, ["a", "b", "c", "d"]), tmp_path / "ours.parquet")
    write_metadata(Metadata(entries, ["a", "b", "c", "d"]), tmp_path / "ours.json")
    pq.write_table(pa.table({"entry": entries}), tmp_path / "bare.parquet")
    for name in ("metaclip.json", "lines.txt", "ours.parquet", "ours.json", "bare.parquet"):
        assert load_metadata(tmp_path / name).entries == entries, name
    assert load_metadata(tmp_path / "ours.parquet").sources == ["a", "b", "c", "d"]
    assert load_metadata(tmp_path / "ours.json").sources == ["a", "b", "c", "d"]
    assert load_metadata(tmp_path / "metaclip.json").sources == ["user"] * 4
    (tmp_path / "noext").write_text(json.dumps(entries))  # JSON is recognised by content too
    assert load_metadata(tmp_path / "noext").entries == entries


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "not found"),
        ("bad.json", b'["dog", ', "invalid JSON"),
        ("dict.json", b'{"dog": 1}', "expected a JSON list"),
        ("mixed.json", b'["dog", 3]', "item 1"),
        ("empty.json", b"[]", "no entries"),
        ("empty.txt", b"\n\n", "no entries"),
        ("binary.txt", b"\xff\xfe\x00dog", "not UTF-8"),
        ("broken.parquet", b"PAR1garbage", "unreadable parquet"),
    ],
)
def test_bad_files_are_one_line_value_errors(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_metadata(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_parquet_without_entry_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"word": ["dog"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="'entry' column"):
        load_metadata(tmp_path / "m.parquet")


def test_write_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.parquet, \.json or \.txt"):
        write_metadata(Metadata(["dog"], ["user"]), tmp_path / "m.csv")
