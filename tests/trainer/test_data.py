"""The shard stream: caption draws, MetaCLIP re-draws, corrupt data, splitting and resume positions."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from synth_shards import write_shards

from pairsift.common.tars import iter_tar_samples
from pairsift.trainer.config import CaptionConfig, ConfigError
from pairsift.trainer.data import (
    StreamSpec,
    TrainLoader,
    assign_shards,
    captions_of,
    check_layout,
    choose_caption,
    expand_shards,
    shard_sizes,
    unit_draw,
)


def spec_for(train: Path | str, readers: int, chunk: int, captions: CaptionConfig | None = None,
             seed: int = 0) -> StreamSpec:
    shards = expand_shards(str(train))
    return StreamSpec(shards=shards, sizes=shard_sizes(shards), readers=readers, chunk=chunk, seed=seed,
                      shuffle_shards=2, captions=captions or CaptionConfig())


def caption_loader(spec: StreamSpec, world: int = 1, rank: int = 0, workers: int = 0, cursors=None):
    """Captions and uids only (no image decode): fast, and enough to check what the stream yields."""
    return TrainLoader(spec, world, rank, workers, cursors, preprocess=None, tokenizer=None)


def chi2_ok(observed: Counter, expected: dict[str, float], n: int) -> bool:
    """Pearson chi-square below its 0.999 quantile for df ≤ 4 (18.5). Draws are hash-seeded: no flakes."""
    stat = sum((observed.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected.items() if p > 0)
    assert sum(observed.get(k, 0) for k, p in expected.items() if p == 0) == 0
    return stat < 18.5


def test_expand_shards_accepts_dir_braces_and_reports_missing(corpus):
    by_dir = expand_shards(str(corpus / "train"))
    by_braces = expand_shards(str(corpus / "train" / "{00000..00007}.tar"))
    assert by_dir == by_braces and len(by_dir) == 8
    assert shard_sizes(by_dir) == [300] * 8
    with pytest.raises(ConfigError, match="shard not found"):
        expand_shards(str(corpus / "train" / "{00000..00009}.tar"))


def test_shard_sizes_read_a_pairsift_runs_meta_sizes_without_indexing_the_tars(tmp_path):
    """A run's shards folder keeps sizes.json in _meta/ (out of webdataset readers' way): it is the
    count used, not the tars' (empty files here, so indexing them would count 0)."""
    shards = tmp_path / "shards"
    (shards / "_meta").mkdir(parents=True)
    for name in ("00000.tar", "00001.tar"):
        (shards / name).write_bytes(b"")
    (shards / "_meta" / "sizes.json").write_text(json.dumps({"00000.tar": 7, "00001.tar": 5}))
    assert shard_sizes(expand_shards(str(shards))) == [7, 5]


def test_uniform_caption_draws_are_laclip_uniform_over_every_caption():
    caps = captions_of({"caption": "alt", "rewrites": ["r1", "r2", "r3"], "enriched_caption": "enr"}, None)
    cfg = CaptionConfig(strategy="uniform")
    n = 20_000
    texts = Counter(choose_caption(caps, cfg, unit_draw(0, 0, f"uid{i}", "cap"))[1] for i in range(n))
    assert chi2_ok(texts, {t: 0.2 for t in ["alt", "r1", "r2", "r3", "enr"]}, n)


def test_weighted_caption_draws_follow_the_veclip_mix():
    caps = captions_of({"caption": "alt", "rewrites": ["r1", "r2"], "enriched_caption": "enr"}, "txt-ignored")
    cfg = CaptionConfig(strategy="weighted", alt=0.3, rewrites=0.0, enriched=0.7)
    n = 20_000
    sources = Counter(choose_caption(caps, cfg, unit_draw(5, 1, f"u{i}", "cap"))[0] for i in range(n))
    assert chi2_ok(sources, {"alt": 0.3, "enriched": 0.7, "rewrites": 0.0}, n)
    # a sample without the enriched caption falls back to what it has
    only_alt = captions_of({}, "just the txt")
    assert choose_caption(only_alt, cfg, 0.99) == ("alt", "just the txt")


def test_caption_mix_through_the_stream(tmp_path):
    """End to end: shards whose json carries rewrites and enriched captions, drawn 1:1:2 by source."""
    def extra(i, meta):
        return {**meta, "rewrites": [f"rw-a {i}", f"rw-b {i}"], "enriched_caption": f"enriched {i}"}

    write_shards(tmp_path / "s", 400, 100, seed=3, extra=extra)
    cfg = CaptionConfig(strategy="weighted", alt=1, rewrites=1, enriched=2)
    loader = caption_loader(spec_for(tmp_path / "s", readers=2, chunk=20, captions=cfg))
    n = 0
    for _ in range(20):  # 800 draws = two epochs, re-drawn per epoch
        n += len(loader.next_batch()["captions"])
    assert chi2_ok(loader.sources, {"alt": 0.25, "rewrites": 0.25, "enriched": 0.5}, n)


def test_keep_prob_redraws_samples_each_epoch(tmp_path):
    from pairsift.trainer.data import Reader

    write_shards(tmp_path / "s", 800, 200, seed=4, extra=lambda i, m: {**m, "keep_prob": 0.25})
    spec = spec_for(tmp_path / "s", readers=1, chunk=50)

    def epochs(n: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(n)]
        for sample, (epoch, _, _) in Reader(spec, 0, (0, 0, 0), None).samples():
            if epoch >= n:
                return out
            out[epoch].append(sample["uid"])
        raise AssertionError("unreachable")

    e0, e1 = epochs(2)
    assert len(e0) == len(set(e0))  # no sample twice within an epoch
    sd = math.sqrt(800 * 0.25 * 0.75)
    assert abs(len(e0) - 200) < 4 * sd and abs(len(e1) - 200) < 4 * sd
    overlap = len(set(e0) & set(e1)) / len(e1)
    assert overlap < 0.45  # independent draws per epoch: expected 0.25, not 1.0
    assert epochs(1)[0] == e0  # seeded by (seed, epoch, uid): reproducible


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path):
    from pairsift.trainer.data import TrainTransform

    src = write_shards(tmp_path / "s", 400, 100, seed=5, corrupt_every=10)
    data = (src / "00003.tar").read_bytes()
    (src / "00003.tar").write_bytes(data[: len(data) // 2])  # a truncated shard
    tf = TrainTransform({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    spec = spec_for(src, readers=1, chunk=30)
    gone = {json.loads(raw["json"])["uid"] for _, raw in iter_tar_samples(src / "00001.tar")}
    (src / "00001.tar").unlink()  # a shard that disappears after the run started
    loader = TrainLoader(spec, 1, 0, 0, None, tf, None)
    uids = []
    for _ in range(10):  # 300 samples: past the first epoch's usable ones
        b = loader.next_batch()
        assert b["images"].shape == (30, 3, 32, 32)
        uids += b["uids"]
    assert loader.skipped["decode_error"] >= 25
    assert loader.skipped["corrupt_shard"] >= 1 and loader.skipped["unreadable_shard"] >= 1
    assert not gone & set(uids)  # kept going on the readable shards


def test_global_batches_do_not_depend_on_ranks_or_workers(corpus):
    """Same readers → same global batch, whether one process, two ranks, or worker processes host them."""
    spec = spec_for(corpus / "train", readers=4, chunk=8)
    single = caption_loader(spec)
    with_workers = caption_loader(spec, workers=2)
    ranks = [caption_loader(spec, world=2, rank=r) for r in range(2)]
    for _ in range(5):
        want = single.next_batch()["uids"]
        assert with_workers.next_batch()["uids"] == want
        assert ranks[0].next_batch()["uids"] + ranks[1].next_batch()["uids"] == want
    with_workers.close()


def test_one_epoch_sees_every_sample_once_and_shards_split_evenly(corpus):
    spec = spec_for(corpus / "train", readers=4, chunk=16)
    assert sorted(len(a) for a in assign_shards(spec.sizes, 4, 0, 0)) == [2, 2, 2, 2]
    loader = caption_loader(spec)
    uids = [u for _ in range(2400 // 64) for u in loader.next_batch()["uids"]]
    assert len(uids) == len(set(uids)) == 2368


def test_cursors_resume_the_stream_exactly(corpus):
    spec = spec_for(corpus / "train", readers=2, chunk=24)
    a = caption_loader(spec)
    for _ in range(30):  # crosses shard windows and the epoch boundary (2400 / 48 = 50 per epoch is later)
        a.next_batch()
    cursors = dict(a.cursors)
    b = caption_loader(spec, cursors=cursors)
    for _ in range(30):  # continues into the next epoch
        assert a.next_batch()["uids"] == b.next_batch()["uids"]


def test_layout_errors_are_one_line():
    with pytest.raises(ConfigError, match="multiple of data.readers"):
        check_layout(readers=4, world=1, hosts=1, micro_batch=30, num_shards=8)
    with pytest.raises(ConfigError, match="cannot feed"):
        check_layout(readers=4, world=2, hosts=2, micro_batch=32, num_shards=3)


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_index_matches_tarfile_for_every_tar_format(tmp_path, fmt):
    import io
    import tarfile

    from pairsift.common.tars import index_tar, read_members

    path = tmp_path / "x.tar"
    names = ["k/0001.jpg", "k/0001.txt", "d" * 70 + "/" + "e" * 90 + ".json", "ünï/0002.txt"]
    form = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    with tarfile.open(path, "w", format=form) as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = bytes([i]) * (700 + i)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    refs, err = index_tar(path)
    assert err is None
    expected: dict[str, dict] = {}
    with tarfile.open(path) as tf:  # the standard library's reading
        spans = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    for name, offset, size in spans:
        key, ext = name.rsplit(".", 1)
        expected.setdefault(key, {})[ext] = (offset, size)
    assert {r.key: r.members for r in refs} == expected
    with open(path, "rb") as f:
        contents = [v for r in refs for v in read_members(f, r).values()]
    assert contents == [bytes([i]) * (700 + i) for i in range(4)]


# ---------------------------------------------------------------- no usable sample at all


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_without_one_usable_sample_stops_after_one_epoch_with_the_reasons(tmp_path, workers):
    """Every image undecodable: the reader stops after one pass (80 samples, not two epochs' 160)
    and says what it skipped, in one line, also when it ran in a DataLoader worker process."""
    from pairsift.trainer.data import NoUsableSamples, TrainTransform

    write_shards(tmp_path / "s", 80, 20, seed=6, corrupt_every=1)
    tf = TrainTransform({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    loader = TrainLoader(spec_for(tmp_path / "s", readers=1, chunk=16), 1, 0, workers, None, tf, None)
    try:
        with pytest.raises(NoUsableSamples) as caught:
            loader.next_batch()
    finally:
        loader.close()
    assert str(caught.value) == ("no usable training sample (reader 0 of 1: its 4 shard(s) of data.train hold "
                                 "80 samples, every one skipped: 80 decode_error); check the shards")
    assert isinstance(caught.value, ConfigError)  # the CLIs print it as one line


def _keep_prob_drawn_only_in(epoch: int, seed: int = 0):
    """``extra`` for write_shards: a keep_prob that the (seed, epoch, uid) draw passes in ``epoch``
    and in no earlier epoch, or 0.0 (never drawn) where that cannot be arranged."""
    def extra(i: int, meta: dict) -> dict:
        draws = [unit_draw(seed, e, meta["uid"], "keep") for e in range(epoch + 1)]
        ok = all(d > draws[-1] + 1e-9 for d in draws[:-1])
        return {**meta, "keep_prob": draws[-1] + 1e-9 if ok else 0.0}
    return extra


def test_an_epoch_with_nothing_drawn_gets_a_second_chance_then_stops(tmp_path):
    """keep_prob can leave an epoch empty by chance, so only two such epochs in a row stop the reader."""
    from pairsift.trainer.data import NoUsableSamples, Reader

    write_shards(tmp_path / "late", 40, 20, seed=7, extra=_keep_prob_drawn_only_in(1))
    spec = spec_for(tmp_path / "late", readers=1, chunk=4)
    drawn_in_epoch_1 = {json.loads(raw["json"])["uid"] for s in spec.shards for _, raw in iter_tar_samples(s)
                        if json.loads(raw["json"])["keep_prob"] > 0}
    assert len(drawn_in_epoch_1) >= 5
    sample, (epoch, _, _) = next(Reader(spec, 0, (0, 0, 0), None).samples())
    assert epoch == 1 and sample["uid"] in drawn_in_epoch_1

    write_shards(tmp_path / "never", 40, 20, seed=7, extra=lambda i, m: {**m, "keep_prob": 0.0})
    with pytest.raises(NoUsableSamples, match=r"hold 40 samples, every one skipped: 40 not_drawn_this_epoch\)"):
        next(Reader(spec_for(tmp_path / "never", readers=1, chunk=4), 0, (0, 0, 0), None).samples())


def test_resuming_at_the_end_of_an_epoch_is_not_an_empty_epoch(tmp_path):
    """A cursor at the last position of an epoch leaves nothing to read in it: that is no reason to stop."""
    write_shards(tmp_path / "s", 40, 20, seed=8)
    spec = spec_for(tmp_path / "s", readers=1, chunk=8)  # shuffle_shards=2: one window of 40 per epoch
    loader = caption_loader(spec, cursors={0: (0, 0, 40)})
    batch = loader.next_batch()
    assert len(batch["uids"]) == 8 and loader.cursors[0] == (1, 0, 8)
    assert batch["uids"] == caption_loader(spec, cursors={0: (1, 0, 0)}).next_batch()["uids"]


def test_each_distinct_caption_is_tokenized_once_and_tokens_match_the_tokenizer(tmp_path):
    """The per-stream token cache changes nothing but the work: three epochs cost one tokenization per
    distinct caption, and every batch's tokens are the tokenizer's own for its captions."""
    import open_clip
    import torch

    tokenize = open_clip.get_tokenizer("ViT-B-32")
    calls = Counter()

    def counting(captions):
        calls.update(captions)
        return tokenize(captions)

    write_shards(tmp_path / "s", 200, 50, seed=5)
    loader = TrainLoader(spec_for(tmp_path / "s", readers=2, chunk=10), 1, 0, 0, None, None, counting)
    seen = set()
    for _ in range(30):  # 600 samples = three epochs
        batch = loader.next_batch()
        assert torch.equal(batch["texts"], tokenize(batch["captions"]))
        seen.update(batch["captions"])
    assert set(calls) == seen and set(calls.values()) == {1}


def test_a_large_jpeg_decodes_at_the_trained_size_and_looks_the_same():
    """libjpeg's scaled decode (draft) is used when it still covers the trained size: a 128 px JPEG
    trained at 32 px decodes at 32 px, within a few grey levels of a full decode resized with PIL."""
    import io

    import numpy as np
    from PIL import Image

    from pairsift.trainer.data import _decode_at_least

    y, x = np.mgrid[0:128, 0:128]
    picture = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, "JPEG", quality=95)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        _decode_at_least(im, (32, 32))
        small = im.convert("RGB")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        full = im.convert("RGB").resize((32, 32), Image.BICUBIC)
    assert small.size == (32, 32)
    assert np.abs(np.asarray(small, np.int16) - np.asarray(full, np.int16)).mean() < 3
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        _decode_at_least(im, (48, 48))  # 1/4 scale would be 32 px < 48: libjpeg picks 1/2
        assert im.convert("RGB").size == (64, 64)


def test_images_kept_decoded_give_the_same_batches_as_decoding_every_time(tmp_path, monkeypatch):
    """Two epochs, so every image is read twice: the decoded-image cache yields exactly the tensors a
    decode per read gives (the crop is redrawn per epoch from the same pixels)."""
    import torch

    from pairsift.trainer import data
    from pairsift.trainer.data import TrainTransform

    write_shards(tmp_path / "s", 120, 40, seed=7, image_size=48)
    transform = TrainTransform({"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3})

    def two_epochs():
        loader = TrainLoader(spec_for(tmp_path / "s", readers=2, chunk=10), 1, 0, 0, None, transform, None)
        return [loader.next_batch()["images"] for _ in range(12)]

    cached = two_epochs()
    monkeypatch.setattr(data, "DECODED_CACHE_BYTES", 0)
    fresh = two_epochs()
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh, strict=True))
