"""Final training shards: the kept samples, repacked into webdataset tars of a chosen size.

Output shard j holds kept samples [j*S, (j+1)*S) in input order, so its contents depend only on
what was kept, never on how many workers ran. Each tar has KEY.<ext> (the image as downloaded),
KEY.txt (caption) and KEY.json (the sample's catalog columns), plus ``_meta/NNNNN.parquet`` with the
same rows; ``__len__`` (the total) lets ``open_clip_train`` read the directory without
``--train-num-samples``, and ``_meta/sizes.json`` holds the count per shard.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pairsift.common.tars import write_tar
from pairsift.pipeline.maintenance import taken_down_uids
from pairsift.pipeline.run_dir import RunDir, ShardDone, write_atomic
from pairsift.pipeline.shard_runner import attach_images, image_extension, load_input
from pairsift.stages.base import IMAGE

Slice = tuple[int, int, int]  # (input shard, first kept row, end kept row)


class CaptionFitter:
    """Makes captions fit a CLIP text encoder's context, counting tokens with open_clip's BPE."""

    def __init__(self, max_tokens: int | None, policy: str = "truncate", extra_columns: tuple[str, ...] = ()):
        """``extra_columns``: the other caption columns stages wrote (a string or a list of strings
        each), from their contracts; the alt-text is ``caption``."""
        self.budget = None if max_tokens is None else max_tokens - 2  # start and end tokens
        self.policy = policy
        self.extra_columns = extra_columns
        self._encode = None

    def tokens(self, text: str) -> int:
        if self._encode is None:
            from open_clip.tokenizer import SimpleTokenizer  # bundled vocabulary: no download

            self._encode = SimpleTokenizer().encode
        return len(self._encode(text))

    def fits(self, text: str) -> bool:
        # Byte-level BPE never makes more tokens than the text has bytes: short captions need no tokenizer.
        return self.budget is None or len(text.encode("utf-8", "replace")) <= self.budget or \
            self.tokens(text) <= self.budget

    def __call__(self, text: str | None) -> str | None:
        """The caption, shortened at a word boundary to fit (or None when the policy is drop)."""
        if text is None or self.fits(text):
            return text
        if self.policy == "drop":
            return None
        words = text.split()
        low, high = 0, len(words)  # the most leading words that fit
        while low < high:
            middle = (low + high + 1) // 2
            if self.fits(" ".join(words[:middle])):
                low = middle
            else:
                high = middle - 1
        return " ".join(words[:low]) or None

    def fit_row(self, row: dict[str, Any]) -> bool:
        """Fit every caption of a sample in place; False when its alt-text itself has to go."""
        if self.budget is None:
            return True
        row["caption"] = self(row.get("caption"))
        for name in self.extra_columns:
            value = row.get(name)
            if isinstance(value, list):
                row[name] = [r for r in (self(x) for x in value) if r]
            elif isinstance(value, str):
                row[name] = self(value)
        return bool(row["caption"])


def plan_output_shards(kept_per_input: dict[int, int], samples_per_shard: int) -> list[list[Slice]]:
    """Cut the kept rows, in input-shard order, into consecutive output shards."""
    total = sum(kept_per_input.values())
    plan: list[list[Slice]] = [[] for _ in range(math.ceil(total / samples_per_shard))]
    position = 0
    for shard in sorted(kept_per_input):
        count, start = kept_per_input[shard], 0
        while start < count:
            out = (position + start) // samples_per_shard
            room = (out + 1) * samples_per_shard - (position + start)
            end = min(count, start + room)
            plan[out].append((shard, start, end))
            start = end
        position += count
    return plan


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sample_json(row: dict[str, Any], columns: list[str] | None, bulky: frozenset[str] = frozenset()) -> bytes:
    names = columns if columns is not None else [n for n in row if n not in bulky]
    return json.dumps({n: _json_safe(row.get(n)) for n in names}, default=str).encode()


class ShardWriter:
    """Worker that writes one output shard from the run's stage outputs."""

    def __init__(self, run_root: str, upstream: list[str], json_columns: list[str] | None,
                 max_caption_tokens: int | None = None, long_captions: str = "truncate",
                 caption_columns: tuple[str, ...] = (), bulky_columns: frozenset[str] = frozenset({IMAGE})):
        """``caption_columns`` and ``bulky_columns`` come from the stages' contracts: captions to fit
        to the text encoder's context, and columns kept out of each sample's json and parquet."""
        self.run = RunDir(run_root)
        self.upstream = upstream
        self.json_columns = json_columns
        self.bulky = bulky_columns | {IMAGE}
        self.fit_captions = CaptionFitter(max_caption_tokens, long_captions, caption_columns)
        self.taken_down = pa.array(sorted(taken_down_uids(run_root)), pa.string())  # never written again

    def _rows(self, slices: list[Slice]) -> pa.Table:
        pieces = []
        for shard, start, end in slices:
            table = load_input(self.run, self.upstream, shard).slice(start, end - start)
            pieces.append(attach_images(self.run, self.upstream, shard, table))
        return pa.concat_tables(pieces, promote_options="permissive")

    def write(self, index: int, slices: list[Slice], config_hash: str, upstream_versions: list[str]) -> ShardDone:
        started = time.perf_counter()
        rows = self._rows(slices)
        taken = pc.is_in(rows.column("uid"), value_set=self.taken_down)
        taken_down = pc.sum(taken).as_py() or 0
        rows = rows.filter(pc.invert(taken)) if taken_down else rows
        tar_path = self.run.shards.tar(index)
        written: list[dict[str, Any]] = []
        missing = too_long = 0
        with write_tar(tar_path) as tar:
            for row in rows.to_pylist():
                image = row.get(IMAGE)
                if not image:
                    missing += 1  # kept but imageless: cannot be a training sample
                    continue
                if not self.fit_captions.fit_row(row):
                    too_long += 1
                    continue
                key = row["uid"]
                tar.add_sample([(f"{key}.{image_extension(image)}", image),
                                (f"{key}.txt", (row.get("caption") or "").encode("utf-8", "replace")),
                                (f"{key}.json", sample_json(row, self.json_columns, self.bulky))])
                written.append(row)
        # The parquet holds the same rows with the same (fitted) captions as the tar.
        schema = pa.schema([f for f in rows.schema if f.name not in self.bulky])
        write_atomic(self.run.shards.table_of(tar_path),
                     pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in written], schema=schema))
        dropped = {k: v for k, v in (("no_image", missing), ("caption_too_long_for_context", too_long),
                                     ("takedown", taken_down)) if v}
        done = ShardDone(config_hash=config_hash, upstream=upstream_versions, rows_in=rows.num_rows + taken_down,
                         kept=len(written), dropped=dropped, seconds=time.perf_counter() - started)
        self.run.mark_done(tar_path, done)
        return done


def write_sizes(run: RunDir, n_shards: int) -> dict[str, int]:
    sizes = {}
    for index in range(n_shards):
        done = run.read_done(run.shards.tar(index))
        if done is not None:
            sizes[run.shards.tar(index).name] = done.kept
    run.shards.write_sizes(sizes)
    return sizes


def remove_stale_shards(run: RunDir, n_shards: int) -> None:
    """A rerun that keeps fewer samples must not leave old shards behind under valid names."""
    run.shards.remove_from(n_shards)
