"""Personal data in captions (``pii``): e-mail addresses, phone numbers and street addresses.

Phone numbers are found by ``phonenumbers`` (Google's libphonenumber rules, Apache-2.0) in the
regions the config names, at its VALID leniency, so order numbers, sizes and dates are not phones;
e-mail addresses and street addresses ("221 Baker Street", "1600 Amphitheatre Pkwy") by patterns.
``pii`` lists the kinds found in each caption. ``action``: ``flag`` only records them, ``drop``
drops the row with reason ``pii``, ``redact`` rewrites the caption the later stages and the
training shards read, each finding replaced by ``[email]``, ``[phone]`` or ``[address]`` (the
ingest part keeps the input as it was given).
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from pairsift.stages.base import ConceptSpec, Contract, Stage, StageConfig, with_reason

CAPTION, PII, REASON_PII = "caption", "pii", "pii"
Kind = Literal["email", "phone", "address"]

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_SUFFIXES = ("street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|"
             "parkway|pkwy|highway|hwy|square|sq|circle|cir|trail|trl|strasse|straße|rue|calle|via")
ADDRESS = re.compile(rf"\b\d{{1,5}}[A-Za-z]?\s+(?:[A-Z][\w'-]*\.?\s+){{1,3}}(?:{_SUFFIXES})\b\.?", re.IGNORECASE)


class PiiConfig(StageConfig):
    kinds: list[Kind] = Field(default_factory=lambda: ["email", "phone", "address"])
    phone_regions: list[str] = Field(default_factory=lambda: ["US"],
                                     description="regions whose national formats count (ISO 3166 codes, e.g. GB, DE); "
                                                 "numbers written with + are found whatever the region")
    action: Literal["flag", "drop", "redact"] = "flag"


class Pii(Stage):
    name: ClassVar[str] = "pii"
    config_class: ClassVar[type[StageConfig]] = PiiConfig
    cfg: PiiConfig

    def contract(self) -> Contract:
        writes: dict[str, pa.DataType] = {PII: pa.list_(pa.string())}
        if self.cfg.action == "redact":
            writes[CAPTION] = pa.string()
        return Contract(reads=(CAPTION,), writes=writes, reasons=(REASON_PII,) if self.cfg.action == "drop" else (),
                        concepts={PII: ConceptSpec("kinds of personal data found in captions")})

    def __call__(self, shard: pa.Table) -> pa.Table:
        found, captions = [], []
        for caption in shard.column(CAPTION).to_pylist():
            spans = self.find(caption) if isinstance(caption, str) else []
            found.append(sorted({kind for kind, _, _ in spans}))
            captions.append(redact(caption, spans) if spans else caption)
        out = shard.append_column(PII, pa.array(found, pa.list_(pa.string())))
        if self.cfg.action == "redact":
            out = out.set_column(out.column_names.index(CAPTION), CAPTION, pa.array(captions, pa.string()))
        if self.cfg.action == "drop":
            return with_reason(out, [REASON_PII if kinds else None for kinds in found])
        return out

    def find(self, text: str) -> list[tuple[str, int, int]]:
        """(kind, start, end) of every finding, without overlaps (the earlier, then longer one wins)."""
        spans: list[tuple[str, int, int]] = []
        if "email" in self.cfg.kinds:
            spans += [("email", m.start(), m.end()) for m in EMAIL.finditer(text)]
        if "phone" in self.cfg.kinds:
            spans += phone_spans(text, self.cfg.phone_regions)
        if "address" in self.cfg.kinds:
            spans += [("address", m.start(), m.end()) for m in ADDRESS.finditer(text)]
        chosen: list[tuple[str, int, int]] = []
        for span in sorted(spans, key=lambda s: (s[1], -(s[2] - s[1]))):
            if not chosen or span[1] >= chosen[-1][2]:
                chosen.append(span)
        return chosen


def phone_spans(text: str, regions: list[str]) -> list[tuple[str, int, int]]:
    import phonenumbers

    spans = set()
    for region in regions or [None]:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            spans.add(("phone", match.start, match.end))
    return sorted(spans, key=lambda s: s[1])


def redact(text: str, spans: list[tuple[str, int, int]]) -> str:
    out, position = [], 0
    for kind, start, end in spans:
        out.append(text[position:start] + f"[{kind}]")
        position = end
    return "".join(out) + text[position:]
