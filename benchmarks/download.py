"""Benchmark: the download stage against plain img2dataset on the same URLs, same machine, one run.

Synthesises N photo-like JPEGs (~400x320), serves them from a threaded HTTP server on 127.0.0.1 in
its own process, writes a URL parquet, then times, end to end and each in its own process tree:
  (a) the img2dataset CLI: 2 processes x 16 threads, resize to 256, webdataset output;
  (b) our Download stage: 2 worker processes x 16 threads over shards of 1000 rows (``run_ours``),
      writing each shard's table (images included) to parquet.
Prints a table and ends with ``RESULT name=download ratio=<ours/img2dataset> ... device=cpu``.

    .venv/bin/python benchmarks/download.py [--n 2000] [--processes 2] [--threads 16]
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault(
    "NO_ALBUMENTATIONS_UPDATE", "1"
)  # albumentations (via img2dataset) calls home otherwise

SHARD_ROWS = 1000
IMAGE_SIZE = 256
TIMEOUT_S = 5


# --- input ------------------------------------------------------------------------------------


def draw_jpeg(index: int) -> bytes:
    """A ~400x320 photo-like JPEG: noise under random shapes, so files are not trivially small."""
    import io

    from PIL import Image, ImageDraw

    rng = random.Random(index)
    width, height = 400 + rng.randrange(-16, 17), 320 + rng.randrange(-16, 17)
    image = Image.effect_noise((width, height), 30 + rng.randrange(30)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x, y = rng.randrange(width), rng.randrange(height)
        box = [x, y, x + rng.randrange(20, width // 2), y + rng.randrange(20, height // 2)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_one(args: tuple[int, str]) -> int:
    index, directory = args
    data = draw_jpeg(index)
    Path(directory, f"{index:06d}.jpg").write_bytes(data)
    return len(data)


def synthesise(directory: Path, n: int, processes: int) -> float:
    """Write n JPEGs; returns their mean size in KB."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        sizes = pool.map(_write_one, [(i, str(directory)) for i in range(n)], chunksize=64)
    return sum(sizes) / len(sizes) / 1000


def write_url_parquet(path: Path, base_url: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"{base_url}/{i:06d}.jpg" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"synthetic image {i}" for i in range(n)]}), path)


# --- the file server (its own process, so neither side shares a GIL with it) ----------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


class _FileServer(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 drops SYNs under 32 clients: 1 s stalls
    daemon_threads = True


def serve(directory: str) -> None:
    handler = functools.partial(_QuietHandler, directory=directory)
    with _FileServer(("127.0.0.1", 0), handler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()


def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "serve", str(directory)], stdout=subprocess.PIPE, text=True
    )
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}"


# --- (a) img2dataset ----------------------------------------------------------------------------


def run_img2dataset(url_parquet: Path, out_dir: Path, processes: int, threads: int) -> tuple[int, float]:
    """Run the CLI; returns (successes, seconds from the first shard's start to the last one's end)."""
    command = [
        str(Path(sys.executable).parent / "img2dataset"),
        "--url_list",
        str(url_parquet),
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_folder",
        str(out_dir),
        "--output_format",
        "webdataset",
        "--processes_count",
        str(processes),
        "--thread_count",
        str(threads),
        "--image_size",
        str(IMAGE_SIZE),
        "--timeout",
        str(TIMEOUT_S),
        "--retries",
        "0",
        "--number_sample_per_shard",
        str(SHARD_ROWS),
        "--disallowed_header_directives",
        "[]",
        "--distributor",
        "multiprocessing",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(f"{out_dir}/*_stats.json")]
    window = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return sum(s["successes"] for s in stats), window


# --- (b) ours -----------------------------------------------------------------------------------


def _run_ours_timed(
    url_parquet: str | Path, out_dir: str | Path, processes: int, threads: int
) -> tuple[int, float]:
    """The pipeline itself: `pairsift run` with just the download stage, on a local Ray pinned to
    loopback with ``processes`` CPUs, shards of SHARD_ROWS rows. Returns (successes, shard window)."""
    from pairsift.pipeline.config import parse_config
    from pairsift.pipeline.run_dir import RunDir
    from pairsift.pipeline.runner import run_pipeline

    cfg = parse_config({
        "run_dir": str(out_dir),
        "input": {"path": str(url_parquet), "shard_size": SHARD_ROWS},
        "ray": {"node_ip": "127.0.0.2", "num_cpus": processes},
        "executor": {"kind": "ray", "max_workers": processes},
        "stages": [{"stage": "download", "image_size": IMAGE_SIZE, "thread_count": threads,
                    "timeout_s": TIMEOUT_S, "retries": 0, "allow_loopback": True}],
        "shards": {"samples_per_shard": 10 * SHARD_ROWS},
    })
    summary = run_pipeline(cfg)
    run = RunDir(out_dir)
    marks = [run.read_done(run.part("download", s)) for s in range(summary.n_input_shards)]
    window = max(m.finished_at for m in marks) - min(m.finished_at - m.seconds for m in marks)
    return sum(m.kept for m in marks), window


def run_ours(url_parquet: str | Path, out_dir: str | Path, processes: int, threads: int) -> int:
    """Download every URL of ``url_parquet`` through the pipeline on Ray: ``processes`` workers, each
    taking shards of 1000 rows with ``threads`` fetch threads. Returns the number of successes."""
    return _run_ours_timed(url_parquet, out_dir, processes, threads)[0]


def run_ours_in_subprocess(
    url_parquet: Path, out_dir: Path, processes: int, threads: int
) -> tuple[int, float]:
    # A fresh interpreter, like the img2dataset CLI, so both wall clocks include the same start-up.
    output = subprocess.run(
        [sys.executable, __file__, "ours", str(url_parquet), str(out_dir), str(processes), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    successes, window = json.loads(output.strip().splitlines()[-1])
    return successes, window


# --- driver -------------------------------------------------------------------------------------


def timed(fn, *args) -> tuple[int, float, float, float]:
    """(successes, wall seconds, shard-window seconds, CPU seconds of the whole process tree).
    CPU time is the steadiest of the three on a shared machine: it does not count waiting."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    successes, window = fn(*args)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return successes, wall, window, cpu


def _median_run(results: list[tuple[int, float, float, float]]) -> tuple[int, float, float, float]:
    """The run with the median shard window (the table shows a real run, not a mix of several)."""
    return sorted(results, key=lambda r: r[2])[len(results) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each tool; medians reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pairsift-bench-download-") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        mean_kb = synthesise(images, args.n, args.processes)
        server, base_url = start_server(images)
        try:
            url_parquet = root / "urls.parquet"
            write_url_parquet(url_parquet, base_url, args.n)
            trials: dict[str, list[tuple[int, float, float, float]]] = {"img2dataset": [], "pairsift": []}
            for repeat in range(args.repeats):  # alternate, so drifting load hits both tools alike
                for name, fn in [("img2dataset", run_img2dataset), ("pairsift", run_ours_in_subprocess)]:
                    trials[name].append(timed(fn, url_parquet, root / f"{name}-{repeat}", args.processes, args.threads))
        finally:
            server.terminate()
            server.wait()

    # Each repeat's ratio pairs two runs taken moments apart; the median of those is the figure.
    window_ratios = [(i[2] / p[2]) for i, p in zip(trials["img2dataset"], trials["pairsift"])]
    e2e_ratios = [(i[1] / p[1]) for i, p in zip(trials["img2dataset"], trials["pairsift"])]
    runs = {name: _median_run(results) for name, results in trials.items()}
    print(
        f"{args.n} JPEGs (mean {mean_kb:.0f} KB, ~400x320) from 127.0.0.1, resized to {IMAGE_SIZE}, "
        f"{args.processes} processes x {args.threads} threads, {SHARD_ROWS} rows per shard, "
        f"median of {args.repeats} alternating runs each"
    )
    print("  window: first shard start to last shard end (download, decode, resize, write)")
    print("  end to end: the whole command, including interpreter start-up and imports")
    print("  cpu: user+sys seconds of the command's whole process tree (start-up included)")
    print(
        f"{'downloader':<13}{'samples':>8}{'successes':>10}{'window s':>10}{'samples/s':>11}"
        f"{'end-to-end s':>14}{'samples/s':>11}{'cpu s':>8}"
    )
    per_s = {}
    for name, (successes, total_s, window_s, cpu_s) in runs.items():
        per_s[name] = (args.n / window_s, args.n / total_s)
        print(
            f"{name:<13}{args.n:>8}{successes:>10}{window_s:>10.2f}{per_s[name][0]:>11.1f}"
            f"{total_s:>14.2f}{per_s[name][1]:>11.1f}{cpu_s:>8.1f}"
        )
    ratio, ratio_e2e = statistics.median(window_ratios), statistics.median(e2e_ratios)
    print(f"ratio ours/img2dataset per repeat (shard window): {', '.join(f'{r:.2f}' for r in window_ratios)}")
    print(f"ratio ours/img2dataset, median: {ratio:.2f} (shard window), {ratio_e2e:.2f} (end to end)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from text_filter import measure_text_filter  # the sibling benchmark, by path

    text_per_s = measure_text_filter(100_000)
    print(f"text filter: {text_per_s:,.0f} captions/s per core")
    print(
        f"RESULT name=download ratio={ratio:.3f} ours_per_s={per_s['pairsift'][0]:.1f} "
        f"img2dataset_per_s={per_s['img2dataset'][0]:.1f} ratio_end_to_end={ratio_e2e:.3f} "
        f"ours_end_to_end_per_s={per_s['pairsift'][1]:.1f} "
        f"img2dataset_end_to_end_per_s={per_s['img2dataset'][1]:.1f} "
        f"ours_cpu_s={runs['pairsift'][3]:.1f} img2dataset_cpu_s={runs['img2dataset'][3]:.1f} "
        f"ours_successes={runs['pairsift'][0]} img2dataset_successes={runs['img2dataset'][0]} "
        f"text_filter_captions_per_s={text_per_s:.0f} device=cpu"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "ours":
        print(json.dumps(_run_ours_timed(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
    else:
        main()
