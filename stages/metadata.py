"""MetaCLIP metadata: the list of concept entries that balancing counts captions against.

``build_metadata`` makes one offline from three sources, each entry tagged with where it came from:

- ``wordnet``: every lemma name of every WordNet synset (underscores become spaces), read straight
  from the Debian ``wordnet-base`` dictionary files (``/usr/share/wordnet/data.{noun,verb,adj,adv}``).
  We parse the documented ``data.*`` line format ourselves: nltk's reader needs a ``lexnames`` file the
  Debian package lacks and refuses paths outside its data roots.
- ``wordfreq_unigram``: the most frequent English words of the ``wordfreq`` package (data in its wheel).
- ``wordnet_gloss_bigram``: word pairs with high pointwise mutual information (PMI) in WordNet's own
  glosses and example sentences. MetaCLIP mines Wikipedia bigrams by PMI; no offline package ships a
  bigram list, so we mine the largest English text we have offline with the same statistic.

``load_metadata`` reads our file (parquet or JSON with entry/source), MetaCLIP's ``metadata.json``
(a JSON list of strings) or a text file with one entry per line. Entry ids are positions in the file.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pairsift.common.storage import atomic_path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_POS = ("noun", "verb", "adj", "adv")
SOURCE_WORDNET = "wordnet"
SOURCE_UNIGRAM = "wordfreq_unigram"
SOURCE_BIGRAM = "wordnet_gloss_bigram"
SOURCE_USER = "user"

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives in data.adj
_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")
_GLOSS_SEGMENT = re.compile(r"[^a-z'\- ]+")  # a bigram never spans punctuation, digits or quotes


@dataclass(frozen=True)
class Metadata:
    entries: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class MetadataSummary:
    path: Path
    n_entries: int
    by_source: dict[str, int] = field(default_factory=dict)  # first source of each entry -> count


def wordnet_lemmas(wordnet_dir: Path = DEFAULT_WORDNET_DIR) -> list[str]:
    """Lemma names of all synsets, underscores as spaces, in file order, without duplicates."""
    seen: dict[str, None] = {}
    for line in _wordnet_data_lines(wordnet_dir):
        fields = line.split(" ")
        n_words = int(fields[3], 16)
        for i in range(n_words):
            lemma = _ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ")
            seen.setdefault(lemma, None)
    return list(seen)


def wordnet_glosses(wordnet_dir: Path = DEFAULT_WORDNET_DIR) -> Iterator[str]:
    """Gloss text (definition plus quoted examples) of every synset."""
    for line in _wordnet_data_lines(wordnet_dir):
        _, _, gloss = line.partition(" | ")
        yield gloss.strip()


def _wordnet_data_lines(wordnet_dir: Path) -> Iterator[str]:
    paths = [Path(wordnet_dir) / f"data.{pos}" for pos in WORDNET_POS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(
            f"WordNet dictionary files not found ({missing[0]}); install them with "
            "'apt-get install wordnet-base' or pass the directory that holds data.noun etc."
        )
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.startswith("  "):  # the licence header lines start with two spaces
                    yield line


def frequent_unigrams(n: int) -> list[str]:
    """The ``n`` most frequent English words in wordfreq that are made of letters.

    wordfreq lowercases words and writes digits as 0; we keep words of letters with optional inner
    hyphens or apostrophes ("t-shirt", "don't"), which drops number tokens and stray symbols."""
    import wordfreq  # imported here: it loads its word lists lazily but pulls in regex/msgpack

    words = []
    for word in wordfreq.iter_wordlist("en", wordlist="large"):
        if _WORD.fullmatch(word):
            words.append(word)
            if len(words) == n:
                break
    return words


def gloss_bigrams(
    glosses: Iterable[str],
    n: int,
    min_count: int = 3,
    min_pmi: float = 4.0,
    stopwords: frozenset[str] = frozenset(),
) -> list[str]:
    """Up to ``n`` word pairs by descending PMI, among pairs seen at least ``min_count`` times with
    PMI >= ``min_pmi`` (natural log: 4.0 means about 55x more often together than by chance).

    PMI(a, b) = log(c(ab) * N / (c(a) * c(b))). Pairs containing a stopword are skipped: "of the"
    is frequent but names no concept. Ties break by count, then alphabetically, so output is stable.
    On WordNet 3.0's glosses the defaults give about 11,700 pairs ("los angeles", "hard disk")."""
    stream: list[str | None] = []  # all words, None between segments so no pair spans two
    for gloss in glosses:
        for segment in _GLOSS_SEGMENT.split(gloss.lower()):
            stream.extend(_WORD.findall(segment))
            stream.append(None)
    unigrams = Counter(stream)  # counting in one C call per Counter is far faster than per segment
    bigrams = Counter(itertools.pairwise(stream))
    total = sum(unigrams.values()) - unigrams.pop(None, 0)
    scored = []
    for (a, b), count in bigrams.items():
        if a is None or b is None or count < min_count or a in stopwords or b in stopwords:
            continue
        pmi = math.log(count * total / (unigrams[a] * unigrams[b]))
        if pmi < min_pmi:
            continue
        scored.append((-pmi, -count, f"{a} {b}"))
    scored.sort()
    return [text for _, _, text in scored[:n]]


def english_stopwords(n: int = 150) -> frozenset[str]:
    """The ``n`` most frequent English words: function words for bigram mining."""
    import wordfreq

    return frozenset(wordfreq.top_n_list("en", n, wordlist="large"))


def merge_sources(sources: Iterable[tuple[str, Iterable[str]]]) -> Metadata:
    """Deduplicate exact strings across sources, keeping first-seen order; an entry found in
    several sources records them all, joined by '+' ("wordnet+wordfreq_unigram")."""
    merged: dict[str, list[str]] = {}
    for source, entries in sources:
        for entry in entries:
            tags = merged.setdefault(entry, [])
            if source not in tags:
                tags.append(source)
    return Metadata(list(merged), ["+".join(tags) for tags in merged.values()])


def build_metadata(
    out: Path,
    wordnet_dir: Path | None = None,
    n_unigrams: int = 250_000,
    n_bigrams: int = 100_000,
) -> MetadataSummary:
    """Build the offline metadata and write it to ``out`` (.parquet, .json or .txt)."""
    wordnet_dir = Path(wordnet_dir) if wordnet_dir is not None else DEFAULT_WORDNET_DIR
    lemmas = wordnet_lemmas(wordnet_dir)
    unigrams = frequent_unigrams(n_unigrams) if n_unigrams > 0 else []
    bigrams = (
        gloss_bigrams(wordnet_glosses(wordnet_dir), n_bigrams, stopwords=english_stopwords())
        if n_bigrams > 0
        else []
    )
    metadata = merge_sources([(SOURCE_WORDNET, lemmas), (SOURCE_UNIGRAM, unigrams), (SOURCE_BIGRAM, bigrams)])
    write_metadata(metadata, Path(out))
    by_source = Counter(source.split("+")[0] for source in metadata.sources)
    return MetadataSummary(Path(out), len(metadata), dict(by_source))


def write_metadata(metadata: Metadata, out: Path) -> None:
    """Write atomically; the suffix picks the format (.parquet, .json, .txt = entries only)."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".json", ".txt"):
        raise ValueError(f"metadata output {out}: use a .parquet, .json or .txt file name")
    if suffix == ".txt" and any("\n" in e or "\r" in e for e in metadata.entries):
        raise ValueError(f"metadata output {out}: entries contain line breaks; use .parquet or .json")
    # a unique temp file beside ``out`` (created O_EXCL: a link planted at a guessable name in a shared
    # directory is never followed), renamed over ``out`` when complete
    with atomic_path(out) as tmp:
        if suffix == ".parquet":
            table = pa.table(
                {
                    "entry": pa.array(metadata.entries, pa.string()),
                    "source": pa.array(metadata.sources, pa.string()),
                }
            )
            pq.write_table(table, tmp)
        elif suffix == ".json":
            rows = [{"entry": e, "source": s} for e, s in zip(metadata.entries, metadata.sources)]
            tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        else:
            tmp.write_text("".join(f"{e}\n" for e in metadata.entries), encoding="utf-8")


def load_metadata(path: str | Path) -> Metadata:
    """Read a metadata file; any problem is a ValueError with one line naming the file.

    Accepted: our parquet (entry, source columns), JSON (a list of strings as in MetaCLIP's
    metadata.json, or our list of {"entry", "source"} objects), or text with one entry per line
    (blank lines skipped). Entries are kept exactly as written (matching is case-sensitive)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metadata file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        metadata = _load_parquet(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"metadata file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
            metadata = _load_json(text, path)
        else:
            entries = [line for line in text.splitlines() if line.strip()]
            metadata = Metadata(entries, [SOURCE_USER] * len(entries))
    if not metadata.entries:
        raise ValueError(f"metadata file {path}: no entries")
    return metadata


def _load_parquet(path: Path) -> Metadata:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"metadata file {path}: unreadable parquet ({str(exc).splitlines()[0]})") from None
    if "entry" not in table.column_names:
        raise ValueError(f"metadata file {path}: parquet needs an 'entry' column, found {table.column_names}")
    entries = table.column("entry").to_pylist()
    if any(not isinstance(e, str) for e in entries):
        raise ValueError(f"metadata file {path}: 'entry' column must hold non-null strings")
    if "source" in table.column_names:
        sources = [s if s is not None else SOURCE_USER for s in table.column("source").to_pylist()]
    else:
        sources = [SOURCE_USER] * len(entries)
    return Metadata(entries, sources)


def _load_json(text: str, path: Path) -> Metadata:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"metadata file {path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):  # a malformed file is a bad value, not a programming error
        raise ValueError(  # noqa: TRY004
            f"metadata file {path}: expected a JSON list of strings, got {type(data).__name__}"
        )
    entries, sources = [], []
    for index, item in enumerate(data):
        if isinstance(item, str):  # MetaCLIP's metadata.json
            entries.append(item)
            sources.append(SOURCE_USER)
        elif isinstance(item, dict) and isinstance(item.get("entry"), str):  # ours
            entries.append(item["entry"])
            sources.append(str(item.get("source") or SOURCE_USER))
        else:
            raise ValueError(  # noqa: TRY004
                f"metadata file {path}: item {index} is neither a string nor an object with an 'entry' string"
            )
    return Metadata(entries, sources)
