"""Benchmark MetaCLIP balancing: our matcher vs a straightforward pyahocorasick matcher, then the
whole stage (match + count + sample) over pools of growing size.

1. Matching, one core: the same captions against the same ~500k-entry metadata, timed in CPU
   seconds (captions per CPU-second = captions/s per core). The baseline is MetaCLIP's reference
   recipe (spaced caption, one pyahocorasick automaton of " entry " patterns, a set per caption).
   Outputs are checked to be identical before timing counts.
2. Pool: captions are written as parquet shards first (not timed); a fresh process then runs the
   stage like the executor does: partial per shard -> parquet, fit over the stored partials (read
   one at a time), apply per shard -> parquet. Wall time and peak RSS per pool size show whether
   memory stays bounded as the pool grows.

Run: .venv/bin/python benchmarks/balance.py [--pool-sizes 1000000,4000000] [--entries 500000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pairsift.stages.balance import Balance, BalanceConfig
from pairsift.stages.matching import Matcher, metaclip_spacing
from pairsift.stages.metadata import (
    DEFAULT_WORDNET_DIR,
    Metadata,
    build_metadata,
    load_metadata,
    write_metadata,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- inputs ---------------------------------------------------------------------------------------


def make_metadata(path: Path, n_entries: int) -> dict[str, int]:
    """The real offline build (WordNet + wordfreq + gloss bigrams, ~365k entries), padded to
    ``n_entries`` with generated two-word entries of frequent words (source 'generated')."""
    import wordfreq

    if (DEFAULT_WORDNET_DIR / "data.noun").is_file():
        build_metadata(path)
        base = load_metadata(path)
    else:  # no WordNet: everything generated, still the same size
        base = Metadata([], [])
    entries, sources = list(base.entries), list(base.sources)
    seen = set(entries)
    words = wordfreq.top_n_list("en", 20_000)
    rng = random.Random(0)
    while len(entries) < n_entries:
        entry = f"{rng.choice(words)} {rng.choice(words)}"
        if entry not in seen:
            seen.add(entry)
            entries.append(entry)
            sources.append("generated")
    write_metadata(Metadata(entries[:n_entries], sources[:n_entries]), path)
    counts: dict[str, int] = {}
    for source in sources[:n_entries]:
        counts[source.split("+")[0]] = counts.get(source.split("+")[0], 0) + 1
    return counts


class CaptionMaker:
    """Alt-text-like captions: Zipf-distributed English words, some capitalised, punctuation,
    and a metadata entry (often multi-word) dropped into 30% of them. Deterministic per seed."""

    def __init__(self, entries: Sequence[str]):
        import wordfreq

        self.vocab = wordfreq.top_n_list("en", 50_000)
        weights = 1.0 / np.arange(1, len(self.vocab) + 1)
        self.cdf = np.cumsum(weights) / weights.sum()
        self.entries = entries

    def make(self, n: int, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(3, 18, size=n)
        picks = np.searchsorted(self.cdf, rng.random(lengths.sum()))
        words = [self.vocab[i] for i in picks]
        extra = rng.random((n, 4))
        entry_ids = rng.integers(0, len(self.entries), size=n)
        out, at = [], 0
        for i, length in enumerate(lengths):
            caption = words[at : at + length]
            at += length
            if extra[i, 0] < 0.3:
                caption.insert(int(extra[i, 1] * len(caption)), self.entries[entry_ids[i]])
            if extra[i, 2] < 0.4:
                caption[0] = caption[0].capitalize()
            text = " ".join(caption)
            if extra[i, 3] < 0.3:
                text += "."
            elif extra[i, 3] < 0.4:
                text = text.replace(" ", ", ", 1)
            out.append(text)
        return out


# ---- 1. matcher vs baseline -----------------------------------------------------------------------


class PyAhoCorasickMatcher:
    """The straightforward matcher: MetaCLIP's reference recipe with pyahocorasick, per caption."""

    def __init__(self, entries: Sequence[str]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for i, entry in enumerate(entries):
            self.automaton.add_word(f" {entry} ", i)
        self.automaton.make_automaton()

    def match(self, captions: Sequence[str]) -> list[list[int]]:
        return [sorted({i for _, i in self.automaton.iter(metaclip_spacing(c))}) for c in captions]


def cpu_timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def compare_matchers(entries: Sequence[str], captions: list[str], chunk: int, repeats: int) -> dict:
    start = time.process_time()
    ours = Matcher(entries, "metaclip")
    ours_build = time.process_time() - start
    start = time.process_time()
    baseline = PyAhoCorasickMatcher(entries)
    base_build = time.process_time() - start
    array = pa.array(captions, pa.string())

    def run_ours() -> list:
        return [ours.match(array.slice(s, chunk)) for s in range(0, len(array), chunk)]

    ours_s, ours_out = cpu_timed(run_ours, repeats)
    base_s, base_out = cpu_timed(lambda: baseline.match(captions), repeats)
    identical = [x for part in ours_out for x in part.to_pylist()] == base_out
    normalized = Matcher(entries, "normalized", plural_folding=True)
    norm_s, _ = cpu_timed(
        lambda: [normalized.match(array.slice(s, chunk)) for s in range(0, len(array), chunk)], 1
    )
    n_matches = sum(len(x) for x in base_out)
    return {
        "identical": identical,
        "ours_build_s": ours_build,
        "baseline_build_s": base_build,
        "ours_caps_per_s": len(captions) / ours_s,
        "baseline_caps_per_s": len(captions) / base_s,
        "normalized_caps_per_s": len(captions) / norm_s,
        "matches_per_caption": n_matches / len(captions),
    }


# ---- 2. the whole stage over a pool ---------------------------------------------------------------


def write_pool(directory: Path, maker: CaptionMaker, n_captions: int, shard_size: int) -> list[Path]:
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, n_captions, shard_size)):
        path = directory / f"{index:05d}.parquet"
        paths.append(path)
        if path.exists():
            continue
        captions = maker.make(min(shard_size, n_captions - start), seed=index)
        uids = [
            hashlib.blake2b(f"{start + i}\x00{c}".encode(), digest_size=16).hexdigest()
            for i, c in enumerate(captions)
        ]
        pq.write_table(pa.table({"uid": uids, "caption": captions}), path)
    return paths


def run_pool(metadata: str, shard_paths: list[Path], work: Path, t: int) -> dict:
    """The stage as the executor drives it; runs in a fresh process so peak RSS is this run's."""
    from pairsift.pipeline.runner import StoredPartials  # what the runner hands a fit: one partial at a time

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    stage = Balance(BalanceConfig(metadata=metadata, t=t, seed=0))
    stage.setup()
    setup_s, setup_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    partial_paths = []
    for path in shard_paths:
        out = work / f"partial-{path.name}"
        pq.write_table(stage.partial(pq.read_table(path)), out)
        partial_paths.append(out)
    matched_s = time.perf_counter() - start_wall
    fitted = stage.fit(StoredPartials(partial_paths))
    fit_s = time.perf_counter() - start_wall
    n_kept = n_rows = 0
    for path, partial_path in zip(shard_paths, partial_paths):
        applied = stage.apply(pq.read_table(path), fitted, pq.read_table(partial_path))
        pq.write_table(applied.drop_columns(["caption"]), work / f"applied-{path.name}")
        n_rows += len(applied)
        n_kept += applied.column("reason").null_count
    return {
        "rows": n_rows,
        "kept": n_kept,
        "expected_kept": fitted["expected_kept"],
        "n_head_entries": fitted["n_head_entries"],
        "head_share": fitted["head_share"],
        "setup_s": setup_s,
        "match_s": matched_s - setup_s,
        "fit_s": fit_s - matched_s,
        "apply_s": time.perf_counter() - start_wall - fit_s,
        "wall_s": time.perf_counter() - start_wall - setup_s,
        "cpu_s": time.process_time() - start_cpu - setup_cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


def pool_in_subprocess(metadata: Path, shard_dir: Path, n_shards: int, work: Path, t: int) -> dict:
    args = [
        sys.executable,
        __file__,
        "--_pool",
        json.dumps(
            {
                "metadata": str(metadata),
                "shards": str(shard_dir),
                "n_shards": n_shards,
                "work": str(work),
                "t": t,
            }
        ),
    ]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pool_child(spec: str) -> None:
    spec_data = json.loads(spec)
    shards = sorted(Path(spec_data["shards"]).glob("*.parquet"))[: spec_data["n_shards"]]
    work = Path(spec_data["work"])
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_pool(spec_data["metadata"], shards, work, spec_data["t"])))


# ---- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--compare-captions", type=int, default=100_000)
    parser.add_argument("--pool-sizes", default="1000000,4000000")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--t", type=int, default=20_000, help="MetaCLIP-400M's t; scale with pool size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep inputs here (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.pool_sizes.split(",") if s]

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        metadata_path = root / "metadata.parquet"
        by_source = make_metadata(metadata_path, args.entries)
        entries = load_metadata(metadata_path).entries
        maker = CaptionMaker(entries)
        print(f"metadata: {len(entries):,} entries {by_source}")

        captions = maker.make(args.compare_captions, seed=10_000_000)
        cmp = compare_matchers(entries, captions, args.shard_size, args.repeats)
        ratio = cmp["ours_caps_per_s"] / cmp["baseline_caps_per_s"]
        print(
            f"\nmatching {len(captions):,} captions, one core (CPU time, best of {args.repeats}); "
            f"identical output: {cmp['identical']}; {cmp['matches_per_caption']:.1f} matches/caption"
        )
        print(f"{'matcher':<34}{'captions/s/core':>16}{'build s':>10}")
        print(
            f"{'ours (token trie, metaclip)':<34}{cmp['ours_caps_per_s']:>16,.0f}{cmp['ours_build_s']:>10.1f}"
        )
        print(
            f"{'pyahocorasick per caption':<34}{cmp['baseline_caps_per_s']:>16,.0f}"
            f"{cmp['baseline_build_s']:>10.1f}"
        )
        print(f"{'ours (normalized + plurals)':<34}{cmp['normalized_caps_per_s']:>16,.0f}")
        print(f"ratio ours/baseline: {ratio:.2f}x")
        if not cmp["identical"]:
            raise SystemExit("ours and the baseline disagree: the benchmark is void")

        shard_dir = root / "pool"
        pools = {}
        for size in sorted(sizes):
            write_pool(shard_dir, maker, size, args.shard_size)
            n_shards = -(-size // args.shard_size)
            pools[size] = pool_in_subprocess(metadata_path, shard_dir, n_shards, root / f"run-{size}", args.t)
        print(
            f"\nwhole stage (partial + fit + apply, shards of {args.shard_size:,}, t={args.t:,}), fresh process "
            "each; times exclude the matcher build (setup s)"
        )
        print(
            f"{'captions':>10}{'setup s':>9}{'wall s':>8}{'cpu s':>8}{'match s':>9}{'fit s':>7}{'apply s':>9}"
            f"{'caps/s':>9}{'peak RSS MB':>13}{'kept':>11}{'head':>6}"
        )
        for size, r in pools.items():
            print(
                f"{size:>10,}{r['setup_s']:>9.1f}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['match_s']:>9.1f}"
                f"{r['fit_s']:>7.1f}{r['apply_s']:>9.1f}{size / r['wall_s']:>9,.0f}{r['peak_rss_mb']:>13.0f}"
                f"{r['kept']:>11,}{r['n_head_entries']:>6}"
            )

    fields = [
        "name=balance",
        f"ratio={ratio:.2f}",
        f"ours_caps_per_s={cmp['ours_caps_per_s']:.0f}",
        f"baseline_caps_per_s={cmp['baseline_caps_per_s']:.0f}",
        f"entries={len(entries)}",
    ]
    for size, r in pools.items():
        tag = f"{size // 1_000_000}m" if size % 1_000_000 == 0 else str(size)
        fields += [f"pool_{tag}_wall_s={r['wall_s']:.1f}", f"pool_{tag}_peak_rss_mb={r['peak_rss_mb']:.0f}"]
    print("RESULT " + " ".join(fields) + " device=cpu")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_pool":
        _pool_child(sys.argv[2])
    else:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        main()
