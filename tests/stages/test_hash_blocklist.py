"""hash_blocklist: lists made from synthetic images catch exact and re-encoded or resized copies, and nothing else."""

from __future__ import annotations

import hashlib
import io
import random

import pyarrow as pa
import pytest
from PIL import Image

from pairsift.pipeline.synth_draw import SHAPES, TEXTURES, draw_concept
from pairsift.stages import stage_class
from pairsift.stages.blocklist import HashBlocklistConfig
from pairsift.stages.image_hashes import ImageHashes, ImageHashesConfig


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hashlists")
    rnd = random.Random(7)
    pictures = [draw_concept(rnd, c, s, 320, 240, rnd.choice(TEXTURES))
                for c in ("red", "blue", "green", "purple") for s in SHAPES]
    bad, good = pictures[::2], pictures[1::2]  # the operator's list holds half of them
    originals = [jpeg(p) for p in bad]
    (root / "sha.txt").write_text("\n".join(hashlib.sha256(b).hexdigest() for b in originals[:10]) + "\n")
    (root / "md5.txt").write_text("\n".join(hashlib.md5(b).hexdigest() for b in originals[10:]) + "\n")
    hasher = ImageHashes(ImageHashesConfig(perceptual=["phash"]))
    (root / "phash.txt").write_text("\n".join(f"{hasher.hashes(b)['phash']:016x}" for b in originals) + "\n")
    lists = [{"name": "vendor-sha", "path": str(root / "sha.txt"), "kind": "sha256"},
             {"name": "vendor-md5", "path": str(root / "md5.txt"), "kind": "md5"},
             {"name": "perceptual", "path": str(root / "phash.txt"), "kind": "phash", "radius": 10}]
    copies = {"exact": originals,
              "reencoded": [jpeg(p, 55) for p in bad],
              "resized": [jpeg(p.resize((200, 150))) for p in bad]}
    others = [jpeg(p) for p in good] + [jpeg(p, 55) for p in good]
    return lists, copies, others


def run(lists, images):
    stage = stage_class("hash_blocklist")(HashBlocklistConfig(lists=lists))
    table = pa.table({"uid": [f"{i:032x}" for i in range(len(images))], "image": pa.array(images, pa.binary())})
    return stage(table)


@pytest.mark.parametrize("kind", ["exact", "reencoded", "resized"])
def test_recall_on_copies(world, kind):
    lists, copies, _ = world
    out = run(lists, copies[kind])
    hits = out.column("blocklist").to_pylist()
    assert sum(h is not None for h in hits) >= 0.99 * len(hits), hits
    assert set(out.column("reason").to_pylist()) == {"blocklisted"}
    if kind == "exact":  # byte-identical copies are caught by the exact lists, first in line
        assert set(hits) == {"vendor-sha", "vendor-md5"}


def test_no_false_positives_on_the_rest(world):
    lists, _, others = world
    out = run(lists, others)
    assert out.column("blocklist").null_count == len(others)
    assert out.column("reason").null_count == len(others)


def test_a_malformed_list_is_one_line(tmp_path):
    (tmp_path / "bad.txt").write_text("not-hex\n")
    with pytest.raises(ValueError, match="not 16-digit hex phash"):
        run([{"name": "bad", "path": str(tmp_path / "bad.txt"), "kind": "phash"}], [b"x"])
