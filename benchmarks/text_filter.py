"""Text filter throughput: our vectorised stage against a straightforward per-row implementation.

Both apply the same rules (same config, same default patterns, same order of checks) to the same
synthetic, web-like captions on one core; the run first checks that they agree row by row, then
times them. The baseline is what one would write first: a Python loop with ``re`` patterns, one
``pycld2.detect`` per row, and the same py3langid second opinion where cld2 abstains.

    .venv/bin/python benchmarks/text_filter.py [--rows 200000] [--shard 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pairsift.stages.text_filter import TextFilter, TextFilterConfig, second_opinion

SUBJECTS = ("dog", "cat", "red car", "old house", "young woman", "man", "child", "bicycle", "mountain lake",
            "city street", "wooden table", "leather sofa", "birthday cake", "vintage camera", "sailing boat",
            "coffee mug", "pair of running shoes", "wedding dress", "kitchen", "garden", "horse", "bridge")
PLACES = ("on the beach", "in the park", "at sunset", "in the snow", "near the river", "on a white background",
          "in a modern living room", "at night", "in the forest", "on the table", "in Paris", "downtown")
ADJECTIVES = ("beautiful", "small", "large", "cozy", "bright", "vintage", "modern", "happy", "colorful", "rustic")
COLORS = ("red", "blue", "green", "black", "white", "golden", "pink", "grey", "brown", "yellow", "orange", "navy")
DETAILS = ("with a ball", "and a blue sky", "under a tree", "next to a window", "in the rain", "with flowers",
           "by a famous photographer", "during winter", "in high resolution", "from above", "with friends",
           "in black and white", "for sale", "on a sunny day", "with mountains in the background", "")
PRODUCT = ("Women's", "Men's", "Kids", "New", "Classic", "Premium", "Organic", "Handmade", "Set of 4", "2024")
FOREIGN = (
    "Un perro corriendo en la playa al atardecer con su dueño",
    "Ein kleiner Hund spielt im Garten mit einem roten Ball",
    "Une belle maison ancienne au bord de la rivière en été",
    "Una casa antigua con un jardín lleno de flores",
    "Der alte Bahnhof in der Stadt bei Nacht mit vielen Lichtern",
    "Le chat dort sur le canapé du salon pendant l'après-midi",
    "Um cachorro brincando no parque com uma bola vermelha",
    "Un gatto che dorme sul divano del soggiorno",
)
BOILERPLATE = ("IMG_{n}.jpg", "DSC_{n}.JPG", "image", "Untitled", "no image available", "click here",
               "https://example.com/p/{n}.jpg", "{n}", "photo {n}", "P{n}.JPG", "www.example.com")


def synthetic_captions(n: int, seed: int = 0) -> pa.Table:
    """Alt-text-like captions with the defects a web pool has, in rough LAION-like proportions."""
    rng = random.Random(seed)
    captions: list[str | None] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.62:
            caption = (f"{rng.choice(ADJECTIVES)} {rng.choice(COLORS)} {rng.choice(SUBJECTS)} "
                       f"{rng.choice(PLACES)} {rng.choice(DETAILS)}").strip()
            if rng.random() < 0.5:
                caption = f"{rng.choice(('A', 'The', 'Photo of a', 'Close-up of a'))} {caption}, {rng.randint(1, 999)}"
        elif roll < 0.72:
            caption = (f"{rng.choice(PRODUCT)} {rng.choice(COLORS).title()} {rng.choice(SUBJECTS).title()} - "
                       f"Size {rng.randint(1, 50)} | {rng.choice(ADJECTIVES).title()} Shop {rng.randint(1, 99)}")
        elif roll < 0.80:
            caption = rng.choice(FOREIGN)
        elif roll < 0.88:
            caption = rng.choice(BOILERPLATE).format(n=rng.randint(1000, 99999))
        elif roll < 0.92:
            caption = rng.choice((None, "", "  ", "ok", "a b"))
        elif roll < 0.94:
            caption = " ".join(rng.choice(SUBJECTS) for _ in range(rng.randint(60, 400)))
        elif roll < 0.945:
            caption = f"broken\x00caption {rng.randint(0, 99)}"
        else:  # exact repeats of a common caption from other pages
            caption = rng.choice(("Stock photo of a dog", "Product image for the blue chair", "Home decor ideas"))
        captions.append(caption)
    dup_url = [rng.random() < 0.04 for _ in range(n)]
    dup_pair = [d and rng.random() < 0.5 for d in dup_url]
    return pa.table({"caption": pa.array(captions, pa.string()), "dup_url": dup_url, "dup_url_caption": dup_pair})


class PerRowTextFilter:
    """The baseline: the same rules written row by row with ``re`` and one cld2 call per caption."""

    def __init__(self, cfg: TextFilterConfig):
        import pycld2

        self.cfg = cfg
        self.detect = pycld2.detect
        self.cld2_error = pycld2.error
        # re.ASCII gives \d \w \s \b the ASCII meaning they have in RE2.
        self.patterns = [re.compile(p, re.IGNORECASE | re.ASCII) for p in cfg.boilerplate_patterns]
        self.languages = set(cfg.languages or ())
        nonchars = "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(17))
        self.invalid_chars = re.compile(f"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufdd0-\ufdef{nonchars}]")

    def reason(self, caption: str | None, duplicate: bool) -> tuple[str | None, str | None]:
        cfg = self.cfg
        if duplicate:
            return "duplicate", None
        text = (caption or "").strip()
        if not text:
            return "empty_caption", None
        if len(text) < cfg.min_chars:
            return "caption_too_short", None
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            return "caption_too_long", None
        words = len(text.split())
        if words < cfg.min_words:
            return "too_few_words", None
        if cfg.max_words is not None and words > cfg.max_words:
            return "too_many_words", None
        for pattern in self.patterns:
            if pattern.search(text):
                return "boilerplate", None
        if cfg.languages is None:  # no cld2 to refuse bad text: look for the characters it refuses
            return ("invalid_text" if self.invalid_chars.search(text) else None), None
        try:
            reliable, _, details = self.detect(text, isPlainText=True)
        except self.cld2_error:
            return "invalid_text", None
        code = details[0][1] if reliable and details[0][1] != "un" else None
        if code is None and cfg.second_opinion_min_confidence is not None and len(text.encode().split()) >= 3:
            code = second_opinion(text.encode(), cfg.second_opinion_min_confidence)  # where cld2 abstains
        if code is None:
            return (None if cfg.keep_unknown_language else "language"), None
        return (None if code in self.languages or code.split("-")[0] in self.languages else "language"), code

    def __call__(self, shard: pa.Table) -> pa.Table:
        column = "dup_" + self.cfg.dedup
        dups = shard.column(column).to_pylist() if self.cfg.dedup != "none" else [False] * shard.num_rows
        decided = [self.reason(c, bool(d)) for c, d in zip(shard.column("caption").to_pylist(), dups)]
        return shard.append_column("language", pa.array([d[1] for d in decided], pa.string())).append_column(
            "reason", pa.array([d[0] for d in decided], pa.string()))


def _shards(table: pa.Table, rows_per_shard: int) -> list[pa.Table]:
    return [table.slice(i, rows_per_shard) for i in range(0, table.num_rows, rows_per_shard)]


def _pass_seconds(stage, shards: list[pa.Table]) -> float:
    """CPU seconds of one pass. Both run on one core with one Arrow thread, so CPU time is their
    per-core cost, and other jobs on a shared machine cannot inflate it the way they do wall time."""
    start = time.process_time()
    for shard in shards:
        stage(shard)
    return time.process_time() - start


def _rate(stage, shards: list[pa.Table], repeats: int) -> float:
    """Best of ``repeats`` full passes, in captions per second."""
    rows = sum(s.num_rows for s in shards)
    return rows / min(_pass_seconds(stage, shards) for _ in range(repeats))


def compare(cfg: TextFilterConfig, shards: list[pa.Table], repeats: int) -> dict:
    """Check that ours and the baseline decide alike, then time them in alternating passes (so a
    burst of load on a shared machine hits both) and keep each one's best pass."""
    ours, baseline = TextFilter(cfg), PerRowTextFilter(cfg)
    ours.setup()
    got = pa.concat_tables([ours(s) for s in shards])
    want = pa.concat_tables([baseline(s) for s in shards])
    mismatches = sum(
        a != b
        for name in ("reason", "language")
        for a, b in zip(got[name].to_pylist(), want[name].to_pylist())
    )
    best_ours = best_base = float("inf")
    for _ in range(repeats):
        best_ours = min(best_ours, _pass_seconds(ours, shards))
        best_base = min(best_base, _pass_seconds(baseline, shards))
    rows = sum(s.num_rows for s in shards)
    return {"ours": rows / best_ours, "baseline": rows / best_base, "mismatches": mismatches,
            "reasons": Counter(got["reason"].to_pylist())}


def measure_text_filter(n: int = 200_000, rows_per_shard: int = 10_000, repeats: int = 1) -> float:
    """Captions per second of our stage on one core, over ``n`` synthetic captions."""
    stage = TextFilter(TextFilterConfig())
    stage.setup()
    shards = _shards(synthetic_captions(n), rows_per_shard)
    threads = pa.cpu_count()
    pa.set_cpu_count(1)  # one core: Arrow kernels must not borrow a second thread
    try:
        return _rate(stage, shards, repeats)
    finally:
        pa.set_cpu_count(threads)


def _pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shard", type=int, default=10_000, help="rows per shard (the executor's unit)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _pin_one_core()

    shards = _shards(synthetic_captions(args.rows), args.shard)
    table = pa.concat_tables(shards)
    distinct = len(pc.unique(table["caption"])) / table.num_rows
    runs = {
        "default config (en, cld2)": compare(TextFilterConfig(), shards, args.repeats),
        "languages: null (no cld2)": compare(TextFilterConfig(languages=None), shards, args.repeats),
    }
    main_run = runs["default config (en, cld2)"]

    print(f"text_filter on {args.rows:,} synthetic captions ({distinct:.0%} distinct, mean "
          f"{pc.mean(pc.utf8_length(table['caption'])).as_py():.0f} chars), shards of {args.shard:,}, "
          f"one core, CPU time, best of {args.repeats}")
    print("reasons: " + ", ".join(f"{r or 'kept'}={n}" for r, n in main_run["reasons"].most_common()))
    print(f"{'config':<28}{'per-row Python/s':>18}{'pairsift/s':>14}{'ratio':>8}{'disagree':>10}")
    for name, run in runs.items():
        print(f"{name:<28}{run['baseline']:>18,.0f}{run['ours']:>14,.0f}{run['ours'] / run['baseline']:>8.2f}"
              f"{run['mismatches']:>10}")
    # A faster filter that decides differently is not a faster filter.
    if any(run["mismatches"] for run in runs.values()):
        raise SystemExit("ours and the baseline disagree; see the table")
    print(f"RESULT name=text_filter ratio={main_run['ours'] / main_run['baseline']:.2f} "
          f"ours_per_s={main_run['ours']:.0f} baseline_per_s={main_run['baseline']:.0f} device=cpu")


if __name__ == "__main__":
    main()
