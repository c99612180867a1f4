"""Training data: webdataset shards read as a deterministic, resumable stream.

Design (why it is not webdataset's buffer shuffle):
- There are R logical *readers* in total. Each epoch the shard list is shuffled (seed, epoch) and
  dealt to readers by size, so ranks and DataLoader workers split shards, never samples.
- A reader shuffles the samples of ``shuffle_shards`` shards at a time with an exact permutation
  (tar members are indexed, then read by offset), so its position is three ints: a *cursor*
  (epoch, window, pos). Resume restores every reader's cursor: O(1), nothing replayed.
- Global micro-batch k is reader 0's k-th chunk, then reader 1's, ... Ranks host contiguous readers
  and workers host contiguous readers of their rank, so the global batch is the same for any
  launcher, process count and worker count with the same R (that is what lets a 2-process run
  match a 1-process run step for step).
- Per-sample draws (caption choice, MetaCLIP keep, crop) are seeded by (seed, epoch, uid).
Corrupt samples and shards are skipped and counted by reason, never fatal, unless a reader finds
no usable sample at all: then the run stops with one line saying what was skipped and why.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from pairsift.common.images import EXTENSIONS, open_image
from pairsift.common.tars import SampleRef, index_tar, read_members
from pairsift.trainer.config import CaptionConfig, ConfigError

IMAGE_EXTS = tuple(EXTENSIONS)  # the member names an image may have in a shard
Cursor = tuple[int, int, int]  # (epoch, window index, position in the window's permutation)
DECODED_CACHE_BYTES = 256 * 2**20  # decoded images a reader keeps (the demo's default pool: ~47k × 3 KB)
TOKEN_CACHE_MAX = 200_000  # distinct captions a stream keeps tokenized (200k x 77 int64 = 120 MB at most)


# ---------------------------------------------------------------- shard lists and sizes

def expand_shards(spec: str) -> list[Path]:
    """A directory (all *.tar in it), a brace pattern, or several joined by '::'."""
    from braceexpand import braceexpand

    paths: list[Path] = []
    for part in spec.split("::"):
        p = Path(part)
        if p.is_dir():
            paths.extend(sorted(p.glob("*.tar")))
        else:
            paths.extend(Path(x) for x in braceexpand(part))
    if not paths:
        raise ConfigError(f"no .tar shards found at '{spec}'")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"shard not found: {missing[0]} ({len(missing)} missing of {len(paths)})")
    return paths


def shard_sizes(shards: list[Path]) -> list[int]:
    """Samples per shard from each directory's sizes.json (a pairsift run's shards keep it in
    ``_meta/``, out of webdataset readers' way); shards it lacks are counted by index."""
    tables: dict[Path, dict[str, int]] = {}
    sizes = []
    for shard in shards:
        if shard.parent not in tables:
            found = [f for f in (shard.parent / "sizes.json", shard.parent / "_meta" / "sizes.json") if f.is_file()]
            tables[shard.parent] = json.loads(found[0].read_text()) if found else {}
        n = tables[shard.parent].get(shard.name)
        sizes.append(int(n) if n is not None else len(index_tar(shard)[0]))
    return sizes


# ---------------------------------------------------------------- captions and per-sample draws

def unit_draw(seed: int, epoch: int, uid: str, salt: str) -> float:
    """A uniform [0, 1) number that depends only on (seed, epoch, uid, salt)."""
    h = hashlib.blake2b(f"{seed}\x00{epoch}\x00{uid}\x00{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def captions_of(meta: dict[str, Any], txt: str | None) -> dict[str, list[str]]:
    """Every caption a sample carries, by source: alt-text, LaCLIP rewrites, VeCLIP enriched."""
    def clean(x: Any) -> str | None:
        return x.strip() if isinstance(x, str) and x.strip() else None

    alt = clean(meta.get("caption")) or clean(txt)
    rewrites = [c for c in (clean(x) for x in meta.get("rewrites") or []) if c]
    enriched = clean(meta.get("enriched_caption"))
    return {"alt": [alt] if alt else [], "rewrites": rewrites, "enriched": [enriched] if enriched else []}


def choose_caption(captions: dict[str, list[str]], cfg: CaptionConfig, u: float) -> tuple[str, str] | None:
    """(source, text) for a uniform draw ``u``; None when the sample has no caption at all."""
    present = [(s, c) for s, cs in captions.items() for c in cs]
    if not present:
        return None
    if cfg.strategy == "uniform":
        return present[min(int(u * len(present)), len(present) - 1)]
    weights = {"alt": cfg.alt, "rewrites": cfg.rewrites, "enriched": cfg.enriched}
    sources = [s for s, cs in captions.items() if cs and weights[s] > 0]
    if not sources:  # e.g. VeCLIP weights with no enriched caption yet: use what the sample has
        return present[min(int(u * len(present)), len(present) - 1)]
    total = sum(weights[s] for s in sources)
    acc = 0.0
    for s in sources:
        share = weights[s] / total
        if u < acc + share or s == sources[-1]:
            within = (u - acc) / share  # reuse the draw's remainder to pick inside the source
            cs = captions[s]
            return s, cs[min(int(within * len(cs)), len(cs) - 1)]
        acc += share
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the plan: who reads what

def assign_shards(sizes: list[int], readers: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle shards for the epoch and deal them to readers, each to the least-loaded reader."""
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(sizes))
    loads = [0] * readers
    out: list[list[int]] = [[] for _ in range(readers)]
    for s in order:
        j = min(range(readers), key=lambda r: (loads[r], r))
        out[j].append(int(s))
        loads[j] += sizes[s]
    return out


@dataclass
class StreamSpec:
    """Everything a reader needs; plain data so it pickles into DataLoader workers."""

    shards: list[Path]
    sizes: list[int]
    readers: int
    chunk: int  # samples a reader contributes to one global micro-batch
    seed: int
    shuffle_shards: int
    captions: CaptionConfig
    use_keep_prob: bool = True


class NoUsableSamples(ConfigError):
    """A reader went through all of its shards without one usable sample (empty or undecodable)."""


def no_usable_message(j: int, readers: int, shards: int, seen: int, skipped: Counter) -> str:
    where = f"reader {j} of {readers}: its {shards} shard(s) of data.train"
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    if seen == 0:
        return (f"no usable training sample ({where} hold no readable samples{f': {reasons}' if reasons else ''}); "
                "check the shards, or use fewer readers (data.readers, data.workers x processes) than non-empty shards")
    return f"no usable training sample ({where} hold {seen} samples, every one skipped: {reasons}); check the shards"


def one_line(error: NoUsableSamples) -> str:
    """The reader's own message: a DataLoader worker's exception reaches the main process with its
    traceback folded into the message, ending in ``trainer.data.NoUsableSamples: <message>``."""
    lines = str(error).strip().splitlines()
    last = lines[-1] if lines else ""
    _, found, message = last.partition(f"{NoUsableSamples.__name__}: ")
    return message if found else last


@dataclass
class Skipped:
    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1


class Reader:
    """One logical reader: an endless, exactly resumable stream of decoded samples."""

    def __init__(self, spec: StreamSpec, j: int, cursor: Cursor, preprocess: Callable | None):
        self.spec, self.j, self.cursor, self.preprocess = spec, j, cursor, preprocess
        self.skipped = Skipped()
        self._index_cache: dict[int, list[SampleRef]] = {}
        self._decoded: dict[tuple[int, str], Image.Image] = {}  # (shard, key) -> RGB image
        self._decoded_bytes = 0

    def _remember(self, key: tuple[int, str], img: Image.Image) -> None:
        """Keep decoded images while they fit DECODED_CACHE_BYTES: a small pool is read for many epochs
        (the tiny demo's curated set 70 times), and open + decode were a third of the loader's time.
        The crop and resize still run per epoch, on the same pixels a fresh decode would give."""
        size = img.width * img.height * 3
        if self._decoded_bytes + size <= DECODED_CACHE_BYTES:
            self._decoded[key] = img
            self._decoded_bytes += size

    def _windows(self, epoch: int) -> list[list[int]]:
        mine = assign_shards(self.spec.sizes, self.spec.readers, self.spec.seed, epoch)[self.j]
        w = self.spec.shuffle_shards
        return [mine[i:i + w] for i in range(0, len(mine), w)]

    def _index(self, s: int) -> list[SampleRef]:
        if s not in self._index_cache:
            refs, err = index_tar(self.spec.shards[s])
            if err:
                self.skipped.add("corrupt_shard")
            self._index_cache[s] = refs
        return self._index_cache[s]

    def _open(self, s: int) -> io.BufferedReader | None:
        try:
            return open(self.spec.shards[s], "rb")
        except OSError:  # deleted or unreadable since the run started: its samples are skipped
            self.skipped.add("unreadable_shard")
            return None

    def _window_order(self, epoch: int, w: int, shard_ids: list[int]) -> list[tuple[int, int]]:
        self._index_cache = {s: v for s, v in self._index_cache.items() if s in shard_ids}
        flat = [(s, i) for s in shard_ids for i in range(len(self._index(s)))]
        perm = np.random.default_rng([self.spec.seed, epoch, 2, self.j, w]).permutation(len(flat))
        return [flat[p] for p in perm]

    def samples(self) -> Iterator[tuple[dict[str, Any], Cursor]]:
        """Yield (sample, cursor after it); skipped samples are counted, not yielded.

        A whole epoch without a usable sample raises NoUsableSamples: at once when nothing was
        merely not drawn this epoch (keep_prob), else after a second such epoch. (The rest of an
        epoch resumed part-way through may legitimately hold nothing: it does not count.)"""
        epoch, w, pos = self.cursor
        idle_epochs = 0
        while True:
            windows = self._windows(epoch)
            whole_epoch = (w, pos) == (0, 0)
            yielded, seen, skipped_before = False, 0, Counter(self.skipped.counts)
            while w < len(windows):
                order = self._window_order(epoch, w, windows[w])
                files = {s: self._open(s) for s in windows[w]}
                try:
                    while pos < len(order):
                        s, i = order[pos]
                        pos += 1
                        seen += 1
                        sample = self._decode(files[s], s, self._index(s)[i], epoch) if files[s] else None
                        if sample is not None:
                            yielded = True
                            yield sample, (epoch, w, pos)
                finally:
                    for f in files.values():
                        if f is not None:
                            f.close()
                w, pos = w + 1, 0
            if yielded:
                idle_epochs = 0
            elif whole_epoch:
                idle_epochs += 1
                skipped = Counter(self.skipped.counts)
                skipped.subtract(skipped_before)  # this epoch's: with nothing yielded, nothing was cleared
                skipped = +skipped
                if idle_epochs >= 2 or not skipped["not_drawn_this_epoch"]:
                    shards = len({s for window in windows for s in window})
                    raise NoUsableSamples(no_usable_message(self.j, self.spec.readers, shards, seen, skipped))
            epoch, w, pos = epoch + 1, 0, 0

    def _decode(self, f: io.BufferedReader, shard: int, ref: SampleRef, epoch: int) -> dict[str, Any] | None:
        try:
            raw = read_members(f, ref)
        except OSError:
            self.skipped.add("read_error")
            return None
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            if not isinstance(meta, dict):
                meta = {}
        except ValueError:
            meta = {}
        uid = str(meta.get("uid") or ref.key)
        seed = self.spec.seed
        keep = meta.get("keep_prob") if self.spec.use_keep_prob else None
        if isinstance(keep, (int, float)) and unit_draw(seed, epoch, uid, "keep") >= keep:
            self.skipped.add("not_drawn_this_epoch")
            return None
        txt = raw.get("txt", b"").decode("utf-8", "replace") if "txt" in raw else None
        choice = choose_caption(captions_of(meta, txt), self.spec.captions, unit_draw(seed, epoch, uid, "cap"))
        if choice is None:
            self.skipped.add("no_caption")
            return None
        img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is None:
            self.skipped.add("no_image")
            return None
        image = None
        if self.preprocess is not None:
            image = self._image(raw[img_ext], seed, epoch, uid, (shard, ref.key))
            if image is None:
                self.skipped.add("decode_error")
                return None
        return {"uid": uid, "source": choice[0], "text": choice[1], "image": image}

    def _image(self, data: bytes, seed: int, epoch: int, uid: str, key: tuple[int, str]) -> Any:
        img = self._decoded.get(key)
        if img is None:
            try:
                with open_image(data) as im:
                    _decode_at_least(im, getattr(self.preprocess, "size", None))
                    im.load()
                    img = im.convert("RGB")
            except Exception:  # any decoder failure is a bad sample, never a crash
                return None
            self._remember(key, img)
        rng = random.Random(int(unit_draw(seed, epoch, uid, "aug") * 2**62))
        return self.preprocess(img, rng)


def _decode_at_least(im: Image.Image, size: tuple[int, int] | None) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the trained (h, w) size: the
    DCT does the downscaling, so a 64 px image trained at 32 px decodes a quarter of the pixels and the
    resize after the crop reads a quarter as many. Other formats decode in full."""
    if size is not None and im.format == "JPEG":
        im.draft("RGB", (size[1], size[0]))


class TrainTransform:
    """open_clip's training augmentation (RandomResizedCrop, scale 0.9–1, bicubic), seeded per sample.

    Returns uint8 CHW tensors; ``normalize`` runs once per batch on the training device, which is
    cheaper than per image and moves 4× fewer bytes to a GPU."""

    def __init__(self, preprocess_cfg: dict[str, Any], scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        size = preprocess_cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)
        interp = preprocess_cfg.get("interpolation", "bicubic")
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(interp, Image.BICUBIC)
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawing from ``rng``."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                return left, top, left + w, top + h
        side = min(width, height)  # fallback: central square crop
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        box = self.crop_box(img.width, img.height, rng)
        img = img.resize((self.size[1], self.size[0]), resample=self.resample, box=box)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255.0 - mean) / std


# ---------------------------------------------------------------- readers hosted by one process

def host_readers(readers: int, world: int, rank: int, hosts: int, host: int) -> list[int]:
    per_rank = readers // world
    per_host = per_rank // hosts
    start = rank * per_rank + host * per_host
    return list(range(start, start + per_host))


def check_layout(readers: int, world: int, hosts: int, micro_batch: int, num_shards: int) -> None:
    if readers % (world * hosts):
        raise ConfigError(f"data.readers={readers} must be a multiple of world_size × workers = {world * hosts}")
    if micro_batch % readers:
        raise ConfigError(f"micro-batch {micro_batch} (batch_size / accum_steps) must be a multiple of "
                          f"data.readers={readers}")
    if num_shards < readers:
        raise ConfigError(f"{num_shards} shards cannot feed {readers} readers (world_size × workers); "
                          "write more, smaller shards or use fewer workers")


class HostStream:
    """The readers of one process (or DataLoader worker): yields one part per global micro-batch."""

    def __init__(self, spec: StreamSpec, reader_ids: list[int], cursors: dict[int, Cursor],
                 preprocess: Callable | None, tokenizer: Callable | None):
        self.spec, self.reader_ids = spec, reader_ids
        self.cursors, self.preprocess, self.tokenizer = cursors, preprocess, tokenizer
        self._token_cache: dict[str, torch.Tensor] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        readers = [Reader(self.spec, j, self.cursors[j], self.preprocess) for j in self.reader_ids]
        streams = [r.samples() for r in readers]
        while True:
            samples, cursors = [], {}
            for r, stream in zip(readers, streams):
                for _ in range(self.spec.chunk):
                    sample, cursor = next(stream)
                    samples.append(sample)
                cursors[r.j] = cursor
            skipped = Counter()
            for r in readers:
                skipped.update(r.skipped.counts)
                r.skipped.counts.clear()
            yield self._collate(samples, cursors, skipped)

    def _collate(self, samples: list[dict], cursors: dict[int, Cursor], skipped: Counter) -> dict[str, Any]:
        part: dict[str, Any] = {"cursors": cursors, "skipped": dict(skipped), "uids": [s["uid"] for s in samples],
                                "sources": dict(Counter(s["source"] for s in samples))}
        if self.preprocess is not None:
            part["images"] = torch.stack([s["image"] for s in samples])
        part["captions"] = [s["text"] for s in samples]
        if self.tokenizer is not None:
            part["texts"] = self._tokens(part["captions"])
        return part

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        """Tokenize each distinct caption once per stream: a small pool is seen for many epochs, and
        BPE in Python was a fifth of the loader's time. The cache is bounded so a huge pool cannot grow it."""
        cache = self._token_cache
        new = list(dict.fromkeys(c for c in captions if c not in cache))
        if new:
            if len(cache) + len(new) > TOKEN_CACHE_MAX:
                cache.clear()
            cache.update(zip(new, self.tokenizer(new)))
        return torch.stack([cache[c] for c in captions])


class ShardStream(IterableDataset):
    """Each DataLoader worker (or the process itself, with no workers) hosts some of the rank's readers."""

    def __init__(self, spec, world, rank, hosts, cursors, preprocess, tokenizer):
        self.args = (spec, world, rank, hosts, cursors, preprocess, tokenizer)

    def __iter__(self):
        spec, world, rank, hosts, cursors, preprocess, tokenizer = self.args
        info = torch.utils.data.get_worker_info()
        host = info.id if info is not None else 0
        ids = host_readers(spec.readers, world, rank, hosts, host)
        return iter(HostStream(spec, ids, cursors, preprocess, tokenizer))


class TrainLoader:
    """Global-micro-batch-aligned batches for one rank, with the cursors needed to resume."""

    def __init__(self, spec: StreamSpec, world: int, rank: int, workers: int,
                 cursors: dict[int, Cursor] | None, preprocess: Callable | None, tokenizer: Callable | None):
        self.hosts = max(1, workers)
        self.cursors: dict[int, Cursor] = {
            j: (cursors or {}).get(j, (0, 0, 0))
            for h in range(self.hosts) for j in host_readers(spec.readers, world, rank, self.hosts, h)}
        self.skipped: Counter = Counter()
        self.sources: Counter = Counter()
        ds = ShardStream(spec, world, rank, self.hosts, dict(self.cursors), preprocess, tokenizer)
        self._loader = DataLoader(ds, batch_size=None, num_workers=workers,
                                  persistent_workers=False, prefetch_factor=4 if workers else None)
        self._it = iter(self._loader)

    def next_batch(self) -> dict[str, Any]:
        try:
            parts = [next(self._it) for _ in range(self.hosts)]  # workers answer round-robin, in order
        except NoUsableSamples as error:  # from a DataLoader worker: its traceback is in the message
            raise NoUsableSamples(one_line(error)) from None
        for p in parts:
            self.cursors.update({j: tuple(c) for j, c in p["cursors"].items()})
            self.skipped.update(p["skipped"])
            self.sources.update(p["sources"])
        batch: dict[str, Any] = {}
        for key in ("images", "texts"):
            if key in parts[0]:
                batch[key] = torch.cat([p[key] for p in parts])
        for key in ("captions", "uids"):
            if key in parts[0]:
                batch[key] = [c for p in parts for c in p[key]]
        return batch

    def close(self) -> None:
        self._it = None  # lets DataLoader workers shut down


def steps_per_epoch(total_samples: int, batch_size: int) -> int:
    return max(1, math.floor(total_samples / batch_size))
