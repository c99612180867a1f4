"""pii: planted e-mail addresses, phone numbers and street addresses found, and nothing in ordinary alt-text."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from pairsift.stages import stage_class
from pairsift.stages.pii import Pii, PiiConfig

PLANTED = [
    ("Contact jane.doe+shop@example.co.uk for prints", {"email"}),
    ("Call (415) 555-2671 to book the venue", {"phone"}),
    ("Our studio: +44 20 7946 0958, London", {"phone"}),
    ("Open house at 221 Baker Street this Sunday", {"address"}),
    ("Visit 1600 Amphitheatre Pkwy. with the family", {"address"}),
    ("Write to info@cafe-lumiere.fr or call +33 1 42 68 53 00", {"email", "phone"}),
]
CLEAN = [
    "A red car parked near the river at sunset, 2024",
    "Women's Blue Running Shoes - Size 42 | Premium Shop 17",
    "Order 1234567890 ships in 3-5 days",
    "The 3 best hiking trails in 2023",
    "Close-up of a vintage camera on a wooden table, 35mm",
    "Photo taken 2019-05-04 at 12:30",
    "email icon on a white background",
    "Set of 4 coffee mugs, 350 ml",
]


def table(captions):
    return pa.table({"uid": [f"{i:032x}" for i in range(len(captions))], "caption": pa.array(captions, pa.string())})


def test_finds_every_planted_kind_and_nothing_in_clean_captions():
    stage = stage_class("pii")(PiiConfig(phone_regions=["US"]))
    rnd = random.Random(0)
    rows = [(c, k) for c, k in PLANTED] + [(c, set()) for c in CLEAN]
    rnd.shuffle(rows)
    out = stage(table([c for c, _ in rows]))
    assert [set(k) for k in out.column("pii").to_pylist()] == [k for _, k in rows]
    assert out.column("caption").to_pylist() == [c for c, _ in rows]  # flag: captions untouched
    assert "reason" not in out.column_names or out.column("reason").null_count == len(rows)


def test_drop_and_redact():
    captions = [PLANTED[0][0], PLANTED[5][0], CLEAN[0], None]
    dropped = Pii(PiiConfig(action="drop"))(table(captions))
    assert dropped.column("reason").to_pylist() == ["pii", "pii", None, None]
    redacted = Pii(PiiConfig(action="redact"))(table(captions))
    assert redacted.column("caption").to_pylist() == [
        "Contact [email] for prints", "Write to [email] or call [phone]", CLEAN[0], None]
    assert set(Pii(PiiConfig(action="redact")).contract().writes) == {"pii", "caption"}


@pytest.mark.parametrize("kinds", [["email"], ["phone"], ["address"]])
def test_only_the_kinds_asked_for(kinds):
    out = Pii(PiiConfig(kinds=kinds))(table([c for c, _ in PLANTED]))
    assert all(set(k) <= set(kinds) for k in out.column("pii").to_pylist())
    assert sum(bool(k) for k in out.column("pii").to_pylist()) == sum(bool(set(kinds) & k) for _, k in PLANTED)
