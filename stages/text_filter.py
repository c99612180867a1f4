"""Caption filter: drop pairs whose alt-text cannot teach a model anything, before any download.

Checks run in a fixed order and the first failing one names the row's ``reason``: duplicate,
empty_caption, caption_too_short, caption_too_long, too_few_words, too_many_words, boilerplate,
language, invalid_text. Each check only looks at rows that passed the ones before it, so a 1 MB
caption is measured once and never reaches the regexes or the language detector.

Everything except language ID is vectorised with pyarrow compute (RE2 regexes, UTF-8 kernels);
language ID is pycld2 (offline, tables compiled in), called once per distinct surviving caption.
Lengths, word counts and patterns apply to the caption with surrounding whitespace trimmed.
``invalid_text`` = text cld2 refuses: invalid UTF-8 (lone surrogates included), control characters
other than tab/newline/form feed/carriage return, and Unicode noncharacters.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pycld2  # C extension with compiled-in tables: cheap to import, no files, no network
from pydantic import Field, field_validator, model_validator

from pairsift.stages.base import Contract, Stage, StageConfig, with_reason

CAPTION = "caption"
LANGUAGE = "language"
REASONS = (
    "duplicate",
    "empty_caption",
    "caption_too_short",
    "caption_too_long",
    "too_few_words",
    "too_many_words",
    "boilerplate",
    "language",
    "invalid_text",
)
_CODE = {reason: i + 1 for i, reason in enumerate(REASONS)}  # 0 = kept
INVALID = "\x00invalid"  # detect_language's answer for text cld2 refuses; never a language code

# Exactly the code points pycld2 rejects (probed over all of Unicode; a test re-checks it): C0
# controls but \t \n \f \r, DEL and C1, and the noncharacters U+FDD0..U+FDEF and U+xFFFE/U+xFFFF.
_NONCHARACTERS = "".join(f"\\x{{{plane:X}FFFE}}-\\x{{{plane:X}FFFF}}" for plane in range(1, 17))
INVALID_CHARS = (
    "[\\x00-\\x08\\x0b\\x0e-\\x1f\\x7f-\\x{9f}\\x{FDD0}-\\x{FDEF}\\x{FFFE}-\\x{FFFF}" + _NONCHARACTERS + "]"
)

_IMAGE_EXT = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg|ico)"
_GENERIC = (
    r"image|img|photo|photograph|picture|pic|pict|foto|bild|imagen|thumbnail|thumb|placeholder|spacer"
    r"|logo|icon|banner|avatar|profile (?:picture|photo)|(?:product|featured|header|main|default|hero)"
    r" (?:image|photo|picture)|alt|alt text|no alt text|image description|caption|description|graphic"
    r"|loading|null|none|undefined|nan|n/?a|unknown|blank|default|screenshot|screen shot|untitled"
)
# RE2 syntax (pyarrow's regex engine), matched case-insensitively anywhere in the trimmed caption;
# patterns meant to describe the whole caption are anchored with ^...$.
DEFAULT_BOILERPLATE: tuple[str, ...] = (
    # camera / phone file names with or without extension: IMG_1234.jpg, DSC_0042.JPG, P1010023, PXL_2023...
    r"^(?:img|dsc[nf]?|pict|pxl|gopr|gp|mvi|mov|vid|sam|wp|dji|cimg|dcp|imag|photo|image|p)[_-]?\d{3,}"
    r"[\w-]*(?:\." + _IMAGE_EXT + r")?$",
    # any caption that is just a file name: my_photo-2.png, 20190405_123456.jpg
    r"^[\w.()\[\]~+-]+(?: [\w.()\[\]~+-]+){0,3}\." + _IMAGE_EXT + r"$",
    r"\bDCIM\b",
    # a generic word standing in for a description, optionally numbered: "image", "Photo 3", "untitled-1"
    r"^(?:" + _GENERIC + r")(?:[\s_#-]*\d+)?[.:]?$",
    r"^untitled[\s_-]*(?:design|document|drawing|image|photo|picture)?[\s_-]*\d*$",
    r"\bno (?:image|photo|picture|preview|thumbnail|pic)s? (?:is )?(?:available|found|yet)\b",
    r"\b(?:image|photo|picture|preview) (?:is )?(?:not (?:available|found)|unavailable|coming soon|missing)\b",
    r"\bclick (?:here|to (?:enlarge|zoom|view|see|open|expand|download))\b",
    r"\b(?:download|subscribe|sign up|register|order|buy) (?:now|here|today)\b",
    r"\badd to (?:cart|basket|bag|wishlist|wish list)\b",
    r"\b(?:view|see) (?:larger|full size|full-size|image|gallery)\b",
    # share / read-more widgets and screenshot file titles that end up as alt-text
    r"^(?:share|share this|share on \w+|read more|continue reading|learn more|more info)\W*$",
    r"^screen ?shot \d{4}-\d{2}-\d{2}\b",
    # nothing but digits and separators: ids, dates, prices, phone numbers
    r"^[\d\s.,:;/#%+()_\-]+$",
    # a URL or bare domain as the caption
    r"^(?:https?://|ftp://|www\.)\S*$",
    r"^[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|net|org|info|biz|io|co|us|uk|de|fr|es|it|nl|ru|jp|cn|au)(?:/\S*)?$",
)


class TextFilterConfig(StageConfig):
    min_chars: int = Field(5, ge=0, description="shortest trimmed caption kept, in characters")
    max_chars: int | None = Field(1000, ge=1, description="longest trimmed caption kept; None = no limit")
    min_words: int = Field(1, ge=0, description="fewest whitespace-separated words kept")
    max_words: int | None = Field(100, ge=1, description="most words kept; None = no limit")
    languages: list[str] | None = Field(
        ["en"], description="ISO 639-1 codes (cld2's) to keep; None = no language filter or detection"
    )
    keep_unknown_language: bool = Field(
        True, description="keep captions whose language neither detector can tell (short ones mostly)"
    )
    second_opinion_min_confidence: float | None = Field(
        0.5, ge=0, le=1,
        description="cld2 abstains on most short captions; then, for captions of 3+ words, py3langid "
                    "(offline, normalised probabilities) decides when this sure; None = cld2 only",
    )
    boilerplate_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE),
        description="RE2 regexes, case-insensitive, searched in the trimmed caption; a match drops it",
    )
    dedup: Literal["url", "url_caption", "none"] = Field(
        "url_caption", description="drop rows ingest marked dup_url / dup_url_caption (first one is kept)"
    )

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("empty list keeps nothing; use null to switch the language filter off")
        known = {code for _, code in pycld2.LANGUAGES}
        normalised = [code.strip().lower() for code in value]
        unknown = [code for code in normalised if code not in known and code.split("-")[0] not in known]
        if unknown:
            raise ValueError(f"unknown language code(s) {unknown}; use cld2's ISO 639-1 codes such as 'en'")
        return normalised

    @field_validator("boilerplate_patterns")
    @classmethod
    def _re2_patterns(cls, value: list[str]) -> list[str]:
        for index, pattern in enumerate(value):
            if not _compiles(pattern):
                raise ValueError(f"pattern [{index}] {pattern!r} is not a valid RE2 regex (RE2 has no "
                                 f"lookaround or backreferences)")
        if value and not _compiles(combined_pattern(value)):  # e.g. past RE2's memory budget
            raise ValueError(f"the {len(value)} patterns together are too large for one RE2 regex")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> TextFilterConfig:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) is below min_words ({self.min_words})")
        return self


class TextFilter(Stage):
    name: ClassVar[str] = "text_filter"
    config_class: ClassVar[type[StageConfig]] = TextFilterConfig
    cfg: TextFilterConfig

    def __init__(self, cfg: TextFilterConfig):
        super().__init__(cfg)
        self.boilerplate = combined_pattern(cfg.boilerplate_patterns) if cfg.boilerplate_patterns else None
        self.allowed = frozenset(cfg.languages or ())

    def contract(self) -> Contract:
        dedup = () if self.cfg.dedup == "none" else (f"dup_{self.cfg.dedup}",)
        return Contract(reads=(CAPTION, *dedup), writes={LANGUAGE: pa.string()}, reasons=REASONS)

    def __call__(self, shard: pa.Table) -> pa.Table:
        codes = np.zeros(shard.num_rows, np.int8)
        self._check_duplicates(shard, codes)
        text, bad_utf8 = caption_text(shard)
        text = pc.utf8_trim_whitespace(text)
        self._check_lengths(text, codes)
        alive = np.flatnonzero(codes == 0)
        self._check_words_and_patterns(text, codes, alive)
        alive = np.flatnonzero(codes == 0)
        invalid = bad_utf8[alive] | _matches(text.take(alive), INVALID_CHARS)
        languages = self._check_language(text, codes, alive[~invalid])
        _drop(codes, alive[invalid], "invalid_text")
        return with_reason(_with_column(shard, LANGUAGE, languages), _reason_list(codes))

    def _check_duplicates(self, shard: pa.Table, codes: np.ndarray) -> None:
        if self.cfg.dedup == "none":
            return
        column = f"dup_{self.cfg.dedup}"
        if column not in shard.column_names:
            raise ValueError(f"text_filter: dedup={self.cfg.dedup!r} needs the {column!r} column ingest "
                             f"adds; run ingest first or set dedup: none")
        duplicate = pc.fill_null(shard.column(column).cast(pa.bool_()), False).to_numpy()
        _drop(codes, np.flatnonzero(duplicate), "duplicate")

    def _check_lengths(self, text: pa.Array, codes: np.ndarray) -> None:
        chars = pc.fill_null(pc.utf8_length(text), 0).to_numpy()
        _drop(codes, np.flatnonzero(chars == 0), "empty_caption")
        _drop(codes, np.flatnonzero(chars < self.cfg.min_chars), "caption_too_short")
        if self.cfg.max_chars is not None:
            _drop(codes, np.flatnonzero(chars > self.cfg.max_chars), "caption_too_long")

    def _check_words_and_patterns(self, text: pa.Array, codes: np.ndarray, alive: np.ndarray) -> None:
        if len(alive) == 0:
            return
        live = text.take(alive)
        words = pc.list_value_length(pc.utf8_split_whitespace(live)).to_numpy(zero_copy_only=False)
        _drop(codes, alive[words < self.cfg.min_words], "too_few_words")
        if self.cfg.max_words is not None:
            _drop(codes, alive[words > self.cfg.max_words], "too_many_words")
        if self.boilerplate is not None:
            _drop(codes, alive[_matches(live, self.boilerplate)], "boilerplate")

    def _check_language(self, text: pa.Array, codes: np.ndarray, rows: np.ndarray) -> pa.Array:
        """Detect the language of ``rows`` (valid text that passed every earlier check) and drop
        the unwanted ones. Returns the language column: cld2's code where reliable, else null."""
        detected = np.full(len(codes), None, dtype=object)
        if self.cfg.languages is None or len(rows) == 0:
            return pa.array(detected, pa.string())
        # Repeated captions ("Stock photo", shop templates) are common in web data: detect each once,
        # and decide per distinct caption too; numpy then spreads the decisions over the rows.
        encoded = pc.dictionary_encode(text.take(rows))
        found = [self._detect(c) for c in encoded.dictionary.cast(pa.large_binary()).to_pylist()]
        verdict = np.array([self._verdict(code) for code in found], dtype=np.int8)[
            encoded.indices.to_numpy(zero_copy_only=False)
        ]
        _drop(codes, rows[verdict == _CODE["language"]], "language")
        _drop(codes, rows[verdict == _CODE["invalid_text"]], "invalid_text")
        shown = np.array([None if code == INVALID else code for code in found], dtype=object)
        detected[rows] = shown[encoded.indices.to_numpy(zero_copy_only=False)]
        return pa.array(detected, pa.string())

    def _verdict(self, code: str | None) -> int:
        """0 to keep, else the reason code for one detected language."""
        if code == INVALID:
            return _CODE["invalid_text"]
        if code is None:
            return 0 if self.cfg.keep_unknown_language else _CODE["language"]
        wanted = code in self.allowed or code.split("-")[0] in self.allowed
        return 0 if wanted else _CODE["language"]


    def _detect(self, caption: bytes) -> str | None:
        code = detect_language(caption)
        if code is None and self.cfg.second_opinion_min_confidence is not None and len(caption.split()) >= 3:
            code = second_opinion(caption, self.cfg.second_opinion_min_confidence)
        return code


# Web alt-text is overwhelmingly in these; restricting the second opinion to them sharpens its
# probabilities on short captions (a 97-way choice spreads a 5-word caption thin).
_COMMON_LANGUAGES = ("en", "es", "de", "fr", "it", "pt", "nl", "ru", "pl", "tr", "sv", "da", "no", "fi", "cs",
                     "hu", "ro", "el", "uk", "ar", "he", "fa", "hi", "id", "vi", "th", "zh", "ja", "ko")


@functools.cache
def _langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # model ships inside the wheel

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(_COMMON_LANGUAGES))
    return identifier


def second_opinion(caption: bytes, min_confidence: float) -> str | None:
    """py3langid's language when it is at least ``min_confidence`` sure, else None."""
    try:
        code, confidence = _langid().classify(caption.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return code if confidence >= min_confidence else None


def detect_language(caption: bytes) -> str | None:
    """cld2's language code when it is reliable, None when it cannot tell, ``INVALID`` when it
    refuses the text (the vectorised pre-check should have caught that already)."""
    try:
        reliable, _, details = pycld2.detect(caption, isPlainText=True)
    except (pycld2.error, ValueError, TypeError):  # never let one caption fail the shard
        return INVALID
    code = details[0][1]
    return code.lower() if reliable and code != "un" else None


def caption_text(shard: pa.Table) -> tuple[pa.Array, np.ndarray]:
    """The caption column as one valid-UTF-8 large_string array (null stays null), plus a mask of
    rows whose bytes were not valid UTF-8 (those are repaired with U+FFFD so they can be measured)."""
    if CAPTION not in shard.column_names:
        raise ValueError(f"text_filter needs a {CAPTION!r} column; the shard has {shard.column_names}")
    column = shard.column(CAPTION)
    # large_* types first so combining the chunks of a shard of huge captions cannot overflow.
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        text = column.cast(pa.large_binary()).combine_chunks().view(pa.large_string())  # checked below
    else:
        try:
            text = column.cast(pa.large_string()).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"text_filter: caption column has type {column.type}, not text: {exc}") from None
    bad = np.zeros(len(text), dtype=bool)
    try:
        text.validate(full=True)  # one SIMD pass over the bytes
    except pa.ArrowInvalid:  # rare: find the offending rows one by one
        repaired = []
        for i, raw in enumerate(text.view(pa.large_binary()).to_pylist()):
            if raw is not None:
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad[i] = True
                    raw = raw.decode("utf-8", errors="replace")
            repaired.append(raw)
        text = pa.array(repaired, pa.large_string())
    return text, bad


def combined_pattern(patterns: list[str]) -> str:
    """One alternation instead of a pass per pattern: RE2 matches all of them in a single scan."""
    return "|".join(f"(?:{p})" for p in patterns)


def _compiles(pattern: str) -> bool:
    probe = pa.array([""], pa.string())  # pyarrow compiles the regex only when there is a row
    try:
        pc.match_substring_regex(probe, pattern, ignore_case=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _matches(text: pa.Array, pattern: str) -> np.ndarray:
    if len(text) == 0:
        return np.zeros(0, dtype=bool)
    found = pc.match_substring_regex(text, pattern, ignore_case=True)
    return pc.fill_null(found, False).to_numpy(zero_copy_only=False)


def _drop(codes: np.ndarray, rows: np.ndarray, reason: str) -> None:
    """Give ``rows`` this reason unless an earlier check already dropped them."""
    chosen = rows[codes[rows] == 0]
    codes[chosen] = _CODE[reason]


def _reason_list(codes: np.ndarray) -> list[str | None]:
    names = np.array((None, *REASONS), dtype=object)
    return names[codes].tolist()


def _with_column(shard: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in shard.column_names:
        return shard.set_column(shard.column_names.index(name), name, values)
    return shard.append_column(name, values)
