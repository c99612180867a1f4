"""Checks on captions going into and coming out of a language model (the recaption stages).

Captions are untrusted web text: they enter prompts only as sanitised, quoted, single-line data
after the instruction (``sanitize``), and every model output is parsed (``parse_completion``) and
validated before it is kept: length bounds, not garbage, no instruction-following chatter, not a
copy of the caption, not an echo of the prompt (``EchoGuard``), and for a fused caption, the
alt-text's names and numbers kept (``key_facts``). A check answers with a flag (why a candidate was
rejected) or ``None``; the stages record flags per row, never raise.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
_SPACES = re.compile(r"\s+")
# Outputs that talk to the user or about the task instead of describing an image, template and
# chat markers, links: the signature of a model following (or echoing) instructions.
_INSTRUCTION = re.compile(
    r"\bas an ai\b|\blanguage model\b|\bi(?: cannot| can['’]t| can not| won['’]t| will not"
    r"|(?:['’]m| am) (?:unable|not able|sorry))\b"
    r"|\bhere(?:'s| is| are)\b|^\s*(?:sure|certainly|okay|ok)\b[,!.]|\brewrit|\bparaphras|\bcaption\s*:"
    r"|\binstruction|\bignore (?:all |the )?(?:previous|above)|\b(?:assistant|user|system)\s*:"
    r"|https?://|www\.|<\|?/?[a-z_]*\|?>|\[/?inst\]|```|=>",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-case words only: two texts that differ in case, spacing or punctuation compare equal."""
    return " ".join(_WORD.findall(text.lower()))


# Characters that render as nothing but reach the model: deleted (a space would split a word they sit
# in). The tag block U+E0000-E007F spells hidden ASCII ("ASCII smuggling"), variation selectors hide
# bytes, bidi embeddings/overrides/isolates and marks reorder what a reviewer sees (Trojan Source),
# zero-width spaces/joiners, the word joiner, invisible operators, soft hyphen, grapheme joiner and
# Hangul fillers hide or split words.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
)
# Anything a model may read as a double quote becomes an apostrophe (the prompt quotes captions with
# "); full-width = and > fold to ASCII so that a look-alike arrow is caught as an arrow.
_LOOKALIKES = str.maketrans(
    {**dict.fromkeys('"\u201c\u201d\u201e\u201f\u2033\u2036\u3003\uff02\u00ab\u00bb\u2039\u203a'
                     "\u301d\u301e\u301f\u02ba\u02ee\u05f4", "'"),
     "\uff1d": "=", "\uff1e": ">"}
)


def sanitize(text: str, max_chars: int) -> str:
    """A caption as one line of quoted data: no invisible or control characters, newlines, quotes
    (or look-alikes) or arrows."""
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub(" ", text)  # line breaks, tabs, C0/C1 controls, line/paragraph separators
    text = text.translate(_LOOKALIKES).replace("=>", "->")
    text = _SPACES.sub(" ", text).strip()
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


def parse_completion(text: str) -> str:
    """The caption in a raw completion: its first non-empty line, without quotes, markers and labels."""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    if not lines:
        return ""
    line = lines[0]
    line = re.sub(r"^(?:[-*•>]+|\d+[.)])\s*", "", line)  # list bullets / numbering
    line = re.sub(
        r"^(?:rewrite|caption|description|output|answer)\s*\d*\s*:\s*", "", line, flags=re.IGNORECASE
    )
    if line.startswith(("'", '"', "“")):
        line = line[1:]
        for quote in ('"', "”"):
            if quote in line:
                line = line.split(quote, 1)[0]
    else:
        line = line.split('"', 1)[0]  # text after a closing quote is the model running on
    return line.strip().strip("\"'“”").strip()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Bounds:
    min_words: int = 2
    max_words: int = 40
    max_chars: int = 300
    min_letter_ratio: float = 0.6  # letters among non-space characters


@dataclass
class EchoGuard:
    """What a candidate must not repeat from the prompt: its instruction and its example texts.

    An echo is an exact example text, any 5 words in a row of the instruction, or 8 words in a row
    of an example (phrases also in the caption itself are allowed: the rewrite may keep them)."""

    texts: frozenset[str]  # normalised example captions and rewrites
    instruction_grams: frozenset[tuple[str, ...]]
    example_grams: frozenset[tuple[str, ...]]

    @classmethod
    def of(cls, instruction: list[str], examples: list[str]) -> EchoGuard:
        return cls(
            frozenset(normalize(t) for t in examples),
            frozenset(g for t in instruction for g in ngrams(t, 5)),
            frozenset(g for t in examples for g in ngrams(t, 8)),
        )

    def echoes(self, candidate: str, caption: str = "") -> bool:
        if normalize(candidate) in self.texts:
            return True
        short = ngrams(candidate, 5) - ngrams(caption, 5)
        long = ngrams(candidate, 8) - ngrams(caption, 8)
        return bool(short & self.instruction_grams or long & self.example_grams)


def check_text(text: str, bounds: Bounds) -> str | None:
    """Why an output is not a usable caption (``None`` = usable): emptiness, bounds, garbage."""
    if not text:
        return "empty"
    if _CONTROL.search(text) or "\ufffd" in text:
        return "garbage"
    words = text.split()
    if len(words) < bounds.min_words:
        return "too_short"
    if len(words) > bounds.max_words or len(text) > bounds.max_chars:
        return "too_long"
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < bounds.min_letter_ratio * len(visible):
        return "garbage"
    if _INSTRUCTION.search(text):
        return "instruction"
    tokens = normalize(text).split()
    if tokens and Counter(tokens).most_common(1)[0][1] > max(3, len(tokens) // 2):
        return "repetitive"
    return None


def validate_rewrite(candidate: str, caption: str, guard: EchoGuard, bounds: Bounds) -> str | None:
    """Why a parsed rewrite is rejected, or ``None`` to keep it."""
    problem = check_text(candidate, bounds)
    if problem:
        return problem
    if normalize(candidate) == normalize(caption):
        return "copy"
    if guard.echoes(candidate, caption):
        return "echo"
    return None


_FUNCTION_WORDS = frozenset(
    "a an the and or of on in at to for with by from over under as is are vs via".split()
)


def key_facts(text: str) -> list[str]:
    """Words a fused caption must keep: numbers, and names (capitalised words not starting a sentence).

    In Title Case text ("Red Apple Isolated on White Background": every content word capitalised)
    capitals say nothing about names, so only the numbers count there."""
    words = [raw.strip(".,;:!?()[]'\"") for raw in text.split()]
    content = [w for w in words if w and w[0].isalpha() and w.lower() not in _FUNCTION_WORDS]
    title_case = len(content) > 1 and all(w[0].isupper() for w in content)
    facts, sentence_start = [], True
    for raw, word in zip(text.split(), words):
        if word and any(c.isdigit() for c in word):
            facts.append(word.lower())
        elif word and not title_case and not sentence_start and word[0].isupper() and len(word) > 1:
            facts.append(word.lower())
        sentence_start = raw.endswith((".", "!", "?"))
    return facts
