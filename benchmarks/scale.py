"""Scale: the text-side stages over growing pools, measured per stage (throughput per core, peak memory).

A pool of generated alt-text-like pairs (URL list parquet) of each size is run through the stages the
MetaCLIP preset puts before download, the way the pipeline runs them: ``ingest`` (stages/ingest.py:
read, uid, duplicate flags, cut into shards), ``ingest`` again with ``spread_domains`` (each domain
dealt over the shards through an on-disk spill), ``text_filter`` (configs/metaclip.yaml's settings) on
every ingested shard, and ``balance`` (MetaCLIP: partial per shard -> parquet, fit over the stored
partials read one at a time, apply per shard) on the rows the text filter kept, against a ~500k-entry
metadata built offline (benchmarks/balance.py). Stages hand shards to each other as parquet files,
like the run directory does.

Every (size, stage) runs in a fresh process pinned to one core with one Arrow thread, so its peak RSS
(VmHWM) is its own and its CPU time is its per-core cost: rows per CPU-second = rows/s per core.
The goal is memory flat as the pool grows: what a stage keeps must be per shard, per metadata entry
(balance) or per distinct url (ingest's exact dedup, which grows with the pool by design).

The generated pool: captions from Zipf-distributed English words with a metadata entry in a third of
them, product titles, ~10% other languages (wordfreq vocabularies), ~7% boilerplate (file names,
"click here", numbers), empty and overlong captions, 4% exact repeats of an earlier pair and 2% earlier
urls with a new caption; urls spread over 100k domains with a Zipf head. Deterministic per --seed.

    .venv/bin/python benchmarks/scale.py [--sizes 1000000,4000000,10000000] [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK_ROWS = 100_000  # rows generated (and written) at a time: the parent never holds a pool
STAGES = ("ingest", "ingest_spread", "text_filter", "balance")
N_DOMAINS = 100_000
OTHER_LANGUAGES = ("de", "fr", "es", "it", "pt", "nl", "pl", "ru")
TLDS = ("com", "com", "com", "net", "org", "de", "co.uk", "fr", "ru", "jp", "com.br", "io", "info")
PRODUCT = ("Women's", "Men's", "Kids", "New", "Classic", "Premium", "Organic", "Handmade", "Set of 4", "2024")
BOILERPLATE = ("IMG_{n}.jpg", "DSC_{n}.JPG", "image", "Untitled", "no image available", "click here to enlarge",
               "https://example.com/p/{n}.jpg", "{n}", "photo {n}", "P{n}.JPG", "www.example.com", "add to cart",
               "Screenshot 2023-0{d}-1{d} at 10.{n}", "logo", "thumbnail")
SHORT = (None, "", "  ", "ok", "a b", "pic")


def _load_benchmark(name: str):
    """Another benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def peak_rss_mb() -> float:
    """This process's peak RSS. /proc's VmHWM starts afresh at exec; ru_maxrss would carry the
    parent's peak over into the child on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def size_tag(size: int) -> str:
    if size % 1_000_000 == 0:
        return f"{size // 1_000_000}m"
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


# ---- the generated pool ---------------------------------------------------------------------------


class Zipf:
    """Draw words from a vocabulary with Zipf (1/rank) weights."""

    def __init__(self, words: Sequence[str], exponent: float = 1.0):
        self.words = list(words)
        weights = 1.0 / np.arange(1, len(self.words) + 1) ** exponent
        self.cdf = np.cumsum(weights) / weights.sum()

    def indices(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.words) - 1)

    def draw(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self.words[i] for i in self.indices(rng, n)]


class PoolMaker:
    """Web-like (url, caption) rows, chunk by chunk; the same seed gives the same pool, and a pool
    of n rows is the first n rows of any larger one (so every size is a prefix of the largest)."""

    def __init__(self, entries: Sequence[str], seed: int):
        import wordfreq

        self.seed = seed
        self.entries = list(entries)
        self.english = Zipf(wordfreq.top_n_list("en", 50_000))
        self.foreign = [Zipf(wordfreq.top_n_list(lang, 20_000)) for lang in OTHER_LANGUAGES]
        rng = np.random.default_rng([seed, 1 << 20])
        names = self.english.words[200:20_200]  # skip stop words: "theand.com" is no domain
        self.domains = [
            f"{names[rng.integers(len(names))]}{names[rng.integers(len(names))]}.{TLDS[rng.integers(len(TLDS))]}"
            for _ in range(N_DOMAINS)
        ]
        self.domain_pick = Zipf(self.domains, exponent=0.9)
        self.recent: deque[tuple[str, str | None]] = deque(maxlen=50_000)  # what repeats are drawn from

    def chunk(self, index: int, n: int) -> pa.Table:
        rng = np.random.default_rng([self.seed, index])
        kind = rng.random(n)
        repeat = rng.random(n)
        numbers = rng.integers(1000, 99_999, size=n)
        domains = self.domain_pick.indices(rng, n)
        urls: list[str] = []
        captions: list[str | None] = []
        for i in range(n):
            if repeat[i] < 0.04 and self.recent:  # the same pair again (mirrors, re-crawls)
                url, caption = self.recent[int(numbers[i]) % len(self.recent)]
            else:
                caption = self._caption(rng, float(kind[i]), int(numbers[i]))
                if repeat[i] < 0.06 and self.recent:  # a known url with another alt-text
                    url = self.recent[int(numbers[i]) % len(self.recent)][0]
                else:
                    url = self._url(index * CHUNK_ROWS + i, int(domains[i]), caption)
                self.recent.append((url, caption))
            urls.append(url)
            captions.append(caption)
        return pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())})

    def _url(self, row: int, domain: int, caption: str | None) -> str:
        slug = "-".join((caption or "img").split()[:3]).lower()[:40]
        return f"https://{'cdn.' if row % 3 == 0 else ''}{self.domains[domain]}/{2015 + row % 10}/" \
               f"{row % 12 + 1:02d}/{slug}-{row * 2_654_435_761 % (1 << 32):08x}.jpg"

    def _caption(self, rng: np.random.Generator, kind: float, number: int) -> str | None:
        if kind < 0.64:  # English alt-text, a metadata entry in a third of them
            words = self.english.draw(rng, int(rng.integers(3, 18)))
            if rng.random() < 0.33:
                words.insert(int(rng.integers(len(words) + 1)), self.entries[int(rng.integers(len(self.entries)))])
            text = " ".join(words)
            return text[0].upper() + text[1:] + ("." if rng.random() < 0.3 else "")
        if kind < 0.72:  # shop product titles
            words = self.english.draw(rng, 3)
            return (f"{PRODUCT[number % len(PRODUCT)]} {' '.join(w.title() for w in words)} - Size "
                    f"{number % 50} | Shop {number % 97}")
        if kind < 0.82:  # other languages
            vocab = self.foreign[number % len(self.foreign)]
            return " ".join(vocab.draw(rng, int(rng.integers(4, 15)))).capitalize()
        if kind < 0.89:
            return BOILERPLATE[number % len(BOILERPLATE)].format(n=number, d=number % 9)
        if kind < 0.91:
            return SHORT[number % len(SHORT)]
        if kind < 0.92:  # overlong: a keyword dump
            return " ".join(self.english.draw(rng, int(rng.integers(120, 400))))
        words = self.english.draw(rng, int(rng.integers(2, 6)))  # short, plain ones
        return " ".join(words)


def write_pools(directory: Path, entries: Sequence[str], sizes: Sequence[int], seed: int) -> dict[int, Path]:
    """One URL-list parquet per size, all written in one generation pass (prefixes of the largest)."""
    maker = PoolMaker(entries, seed)
    paths = {size: directory / f"urls-{size_tag(size)}.parquet" for size in sizes}
    writers = {size: pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("caption", pa.string())]))
               for size, path in paths.items()}
    try:
        for index, start in enumerate(range(0, max(sizes), CHUNK_ROWS)):
            table = maker.chunk(index, min(CHUNK_ROWS, max(sizes) - start))
            for size, writer in writers.items():
                if start < size:
                    writer.write_table(table.slice(0, size - start))
    finally:
        for writer in writers.values():
            writer.close()
    return paths


# ---- one stage over one pool, in a fresh process --------------------------------------------------


def _pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def _uid_sums(uids: pa.ChunkedArray) -> np.ndarray:
    """Order-free fingerprint of a uid multiset (spread and plain ingest must give the same one):
    each uid's 32 hex chars as four uint64 words, summed with wraparound (sums add over shards)."""
    array = uids.combine_chunks()
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset: array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
    return data.view(np.uint64).reshape(len(array), 4).sum(axis=0, dtype=np.uint64)  # every uid is 32 chars


def run_ingest(spec: dict) -> dict:
    from pairsift.stages.ingest import iter_input_shards

    out = Path(spec["work"]) / spec["stage"]
    out.mkdir(parents=True, exist_ok=True)
    base_rss = peak_rss_mb()
    options = {"spread_domains": True, "spill_dir": spec["work"]} if spec["stage"] == "ingest_spread" else {}
    wall, cpu = time.perf_counter(), time.process_time()
    rows = dup_url = dup_pair = shards = 0
    checksum, check_s = np.zeros(4, np.uint64), 0.0
    for index, table in enumerate(iter_input_shards(spec["input"], shard_size=spec["shard_size"], **options)):
        pq.write_table(table, out / f"part-{index:05d}.parquet")
        rows += table.num_rows
        shards += 1
        check = time.process_time()  # bookkeeping of the benchmark, not ingest's cost
        dup_url += int(np.sum(table.column("dup_url").to_numpy()))
        dup_pair += int(np.sum(table.column("dup_url_caption").to_numpy()))
        checksum += _uid_sums(table.column("uid"))
        check_s += time.process_time() - check
    return {"rows": rows, "kept": rows, "shards": shards, "cpu_s": time.process_time() - cpu - check_s,
            "wall_s": time.perf_counter() - wall, "setup_s": 0.0, "base_rss_mb": base_rss,
            "peak_rss_mb": peak_rss_mb(), "dup_url": dup_url, "dup_url_caption": dup_pair,
            "checksum": [int(x) for x in checksum]}


def run_text_filter(spec: dict) -> dict:
    from pairsift.stages.text_filter import TextFilter, TextFilterConfig

    work = Path(spec["work"])
    out = work / "text_filter"
    out.mkdir(parents=True, exist_ok=True)
    stage = TextFilter(TextFilterConfig(**spec["config"]))
    stage.setup()
    base_rss = peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    rows = kept = 0
    for part in _parts(work / "ingest"):
        result = stage(pq.read_table(part))
        pq.write_table(result.select(["uid", "language", "reason"]), out / part.name)
        rows += result.num_rows
        kept += result.column("reason").null_count
    return {"rows": rows, "kept": kept, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            "setup_s": 0.0, "base_rss_mb": base_rss, "peak_rss_mb": peak_rss_mb()}


def _alive(work: Path, name: str) -> pa.Table:
    """The rows the executor would pass balance: ingested rows the text filter kept, with its columns."""
    shard = pq.read_table(work / "ingest" / name, columns=["uid", "url", "caption"])
    decided = pq.read_table(work / "text_filter" / name)
    shard = shard.append_column("language", decided.column("language"))
    return shard.filter(decided.column("reason").is_null())


def run_balance(spec: dict) -> dict:
    from pairsift.pipeline.runner import StoredPartials  # what the runner hands a fit: one partial at a time
    from pairsift.stages.balance import Balance, BalanceConfig

    work = Path(spec["work"])
    out = work / "balance"
    out.mkdir(parents=True, exist_ok=True)

    setup_wall = time.perf_counter()
    stage = Balance(BalanceConfig(**spec["config"]))
    stage.setup()  # the matcher for the metadata: once per worker, reported apart
    setup_s = time.perf_counter() - setup_wall
    base_rss = peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    names = [p.name for p in _parts(work / "text_filter")]
    partials = []
    rows = kept = 0
    for name in names:
        path = out / f"partial-{name}"
        pq.write_table(stage.partial(_alive(work, name)), path)
        partials.append(path)
    fitted = stage.fit(StoredPartials(partials))
    for name, partial in zip(names, partials):
        result = stage.apply(_alive(work, name), fitted, pq.read_table(partial))
        pq.write_table(result.select(["uid", "matched_entries", "n_matches", "keep_prob", "reason"]), out / name)
        rows += result.num_rows
        kept += result.column("reason").null_count
    return {"rows": rows, "kept": kept, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            "setup_s": setup_s, "base_rss_mb": base_rss, "peak_rss_mb": peak_rss_mb(),
            "t": fitted["t"], "head_entries": fitted["n_head_entries"]}


CHILDREN = {"ingest": run_ingest, "ingest_spread": run_ingest, "text_filter": run_text_filter,
            "balance": run_balance}


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{spec['stage']} on {spec['size']:,} rows failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main -----------------------------------------------------------------------------------------


def preset_configs(metadata: Path) -> tuple[dict, dict]:
    """configs/metaclip.yaml's text_filter and balance settings, with our metadata."""
    import yaml

    stages = yaml.safe_load((ROOT / "configs" / "metaclip.yaml").read_text())["stages"]
    by_name = {s["stage"]: {k: v for k, v in s.items() if k != "stage"} for s in stages}
    return by_name["text_filter"], by_name["balance"] | {"metadata": str(metadata)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,4000000,10000000")
    parser.add_argument("--quick", action="store_true", help="a smoke run: sizes 50k,200k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=100_000, help="rows per input shard")
    parser.add_argument("--entries", type=int, default=500_000, help="metadata entries (MetaCLIP: 500k)")
    parser.add_argument("--workdir", default=None, help="temp files go under here (default: system temp)")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in ("50000,200000" if args.quick else args.sizes).split(",") if s})

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="pairsift-scale-") as tmp:
        root = Path(tmp)
        metadata = root / "metadata.parquet"
        _load_benchmark("balance").make_metadata(metadata, args.entries)
        from pairsift.stages.metadata import load_metadata

        entries = load_metadata(metadata).entries
        text_cfg, balance_cfg = preset_configs(metadata)
        started = time.perf_counter()
        pools = write_pools(root, entries, sizes, args.seed)
        print(f"generated pools {', '.join(size_tag(s) for s in sizes)} in {time.perf_counter() - started:.0f} s; "
              f"metadata {len(entries):,} entries; shards of {args.shard_size:,} rows; "
              f"{os.cpu_count()} cores on the machine, load average {os.getloadavg()[0]:.1f}", flush=True)
        results: dict[int, dict[str, dict]] = {}
        for size in sizes:
            work = root / f"run-{size_tag(size)}"
            results[size] = {}
            for stage in STAGES:
                config = text_cfg if stage == "text_filter" else balance_cfg if stage == "balance" else {}
                spec = {"stage": stage, "size": size, "input": str(pools[size]), "work": str(work),
                        "shard_size": args.shard_size, "config": config}
                results[size][stage] = run_child(spec)
                r = results[size][stage]
                print(f"  {size_tag(size):>5} {stage:<14} {r['rows'] / r['cpu_s']:>10,.0f} rows/s/core "
                      f"{r['peak_rss_mb']:>8,.0f} MB peak", flush=True)
            if results[size]["ingest"]["checksum"] != results[size]["ingest_spread"]["checksum"]:
                raise SystemExit(f"spread ingest of {size:,} rows gave other uids than plain ingest")
            pools[size].unlink()
            shutil.rmtree(work)  # the 10M run's parts take a few GB
        load = os.getloadavg()[0]
    report(results, args.shard_size, load)


def report(results: dict[int, dict[str, dict]], shard_size: int, load: float) -> None:
    print(f"\nper stage, each (size, stage) in a fresh process pinned to one core, one Arrow thread; "
          f"rows/s/core = rows per CPU-second; shards of {shard_size:,} rows; load average at the end {load:.1f}")
    print(f"{'pool':>6} {'stage':<14}{'rows in':>12}{'kept':>12}{'wall s':>9}{'cpu s':>9}{'rows/s/core':>13}"
          f"{'setup s':>9}{'base MB':>9}{'peak MB':>9}")
    for size, stages in results.items():
        for stage, r in stages.items():
            print(f"{size_tag(size):>6} {stage:<14}{r['rows']:>12,}{r['kept']:>12,}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}"
                  f"{r['rows'] / r['cpu_s']:>13,.0f}{r['setup_s']:>9.1f}{r['base_rss_mb']:>9,.0f}"
                  f"{r['peak_rss_mb']:>9,.0f}")
    small, large = min(results), max(results)
    print(f"\npeak RSS by stage, {size_tag(large)} / {size_tag(small)}: " + ", ".join(
        f"{stage} {results[large][stage]['peak_rss_mb'] / results[small][stage]['peak_rss_mb']:.2f}"
        for stage in STAGES))
    ingest = results[large]["ingest"]
    print(f"ingest at {size_tag(large)}: {ingest['dup_url']:,} dup_url, {ingest['dup_url_caption']:,} "
          f"dup_url_caption; spread ingest gave the same uids (checksum) in {results[large]['ingest_spread']['shards']}"
          f" shards")

    def peak(size: int) -> float:
        return max(r["peak_rss_mb"] for r in results[size].values())

    def rate(stage: str) -> float:
        r = results[large][stage]
        return r["rows"] / r["cpu_s"]

    fields = [
        "name=scale",
        f"ratio={peak(large) / peak(small):.2f}",
        f"mem_{size_tag(small)}_mb={peak(small):.0f}",
        f"mem_{size_tag(large)}_mb={peak(large):.0f}",
        f"ingest_rows_s_core={rate('ingest'):.0f}",
        f"ingest_spread_rows_s_core={rate('ingest_spread'):.0f}",
        f"text_filter_rows_s_core={rate('text_filter'):.0f}",
        f"balance_rows_s_core={rate('balance'):.0f}",
        f"ingest_mem_ratio={results[large]['ingest']['peak_rss_mb'] / results[small]['ingest']['peak_rss_mb']:.2f}",
    ]
    print("RESULT " + " ".join(fields) + " device=cpu")


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if len(sys.argv) == 3 and sys.argv[1] == "--_child":
        child_spec = json.loads(sys.argv[2])
        _pin_one_core()
        print(json.dumps(CHILDREN[child_spec["stage"]](child_spec)))
    else:
        main()
