"""Benchmark: crash consistency under random kills, longer and with more seeds than the test.

For each seed, a pipeline runs on a local Ray (bound to 127.0.0.2) while a killer SIGKILLs random
busy Ray workers (tasks and actors: stage parts, pool-stage partials and applies, shard writing);
the driver itself is SIGKILLed at one to three random points, each time after a random number of
pieces of work; then the same command runs again until it finishes. The result must equal an
uninterrupted run of the same config: the ``samples`` catalog, every final shard tar byte for byte,
the shards' parquet and sizes.json, the image tars; nothing lost, nothing duplicated, no temporary
file left, ``verify_run`` clean. Two pipelines:

  toy       render (PNG per row) -> caption_length -> top_fraction (pool stage, actor pool) -> shards
  download  text_filter -> download (the real stage, against a synthetic web on 127.0.0.1)
            -> image_filter -> shards

Prints one row per round and ends with
``RESULT name=chaos kills=<n> lost=<n> duplicated=<n> runs=<n> device=cpu``.

    .venv/bin/python benchmarks/chaos.py [--seeds 6] [--download-seeds 3] [--rows 600]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
# Ray workers inherit this process's environment: they must import the test stages too.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) calls home otherwise

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from cluster_stages import (  # noqa: E402
    CLUSTER_STAGES,
    WorkerKiller,
    cli_argv,
    differences,
    duplicated_samples,
    finished_markers,
    our_raylet,
    run_until_killed,
    temp_files,
    wait_until_idle,
)
from toy_stages import TOY_STAGES  # noqa: E402

from pairsift.common import ray_local  # noqa: E402
from pairsift.pipeline.catalog import query  # noqa: E402
from pairsift.pipeline.config import parse_config  # noqa: E402
from pairsift.pipeline.runner import run_pipeline  # noqa: E402
from pairsift.pipeline.serve import serve  # noqa: E402
from pairsift.pipeline.synth import synthesize  # noqa: E402
from pairsift.pipeline.verify import verify_run  # noqa: E402
from pairsift.stages import STAGES  # noqa: E402

STAGES.update(TOY_STAGES | CLUSTER_STAGES)
MAX_RETRIES = 3


def toy_config(root: Path, pool: Path, kind: str, address: str | None) -> dict:
    return {
        "run_dir": str(root / "run"),
        "input": {"path": str(pool), "shard_size": 50},
        "executor": {"kind": kind, "max_retries": MAX_RETRIES, "shard_timeout_s": 300},
        "ray": {"address": address},
        "stages": [
            {"stage": "render", "sleep_s": 0.2},
            {"stage": "caption_length", "min_chars": 8, "sleep_s": 0.05},
            {"stage": "top_fraction", "fraction": 0.6},
        ],
        "shards": {"samples_per_shard": 70},
    }


def download_config(root: Path, corpus: Path, kind: str, address: str | None) -> dict:
    return {
        "run_dir": str(root / "run"),
        "input": {"path": str(corpus / "urls.parquet"), "shard_size": 100},
        "executor": {"kind": kind, "max_retries": MAX_RETRIES, "shard_timeout_s": 300},
        "ray": {"address": address},
        "stages": [
            {"stage": "text_filter", "min_chars": 5, "min_words": 2, "languages": ["en"], "dedup": "url"},
            {"stage": "download", "image_size": 48, "resize_mode": "keep_ratio", "encode_format": "jpg",
             "timeout_s": 5, "deadline_s": 10, "thread_count": 8, "allow_loopback": True},
            {"stage": "image_filter", "min_side": 24, "max_aspect_ratio": 3.0},
        ],
        "shards": {"samples_per_shard": 150},
    }


@dataclass
class Round:
    pipeline: str
    seed: int
    driver_kills: int = 0
    worker_kills: int = 0
    runs: int = 0
    equal: bool = False
    lost: int = 0
    duplicated: int = 0
    temp_left: int = 0
    verified: bool = False
    seconds: float = 0.0
    notes: tuple[str, ...] = ()


def shard_keys(run_root: Path) -> set[str]:
    keys = set()
    for tar_path in (run_root / "shards").glob("[0-9]*.tar"):
        with tarfile.open(tar_path) as tar:
            keys |= {m.name.rsplit(".", 1)[0] for m in tar}
    return keys


def lost_samples(run_root: Path, reference: Path) -> int:
    """Catalog rows and training samples the uninterrupted run has and this one lacks."""
    def uids(root: Path) -> set[str]:
        return {u for (u,) in query(root, "SELECT uid FROM samples")[1]}
    return len(uids(reference) - uids(run_root)) + len(shard_keys(reference) - shard_keys(run_root))


def chaos_round(name: str, seed: int, cfg: dict, reference: Path, root: Path, raylet: int,
                image_stages: tuple[str, ...]) -> Round:
    rng = random.Random(seed)
    result = Round(name, seed)
    started = time.perf_counter()
    run_root = Path(cfg["run_dir"])
    cfg_path = root / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    total = finished_markers(reference)
    for attempt in range(rng.randint(1, 3)):
        done = finished_markers(run_root) if run_root.exists() else 0
        if done >= total - 1:
            break
        target = rng.randint(done + 1, total - 1)
        with WorkerKiller(raylet, rng, budget=MAX_RETRIES) as killer:
            result.driver_kills += run_until_killed(cli_argv("run", str(cfg_path)), run_root, target,
                                                    log=root / f"driver-{attempt}.log", timeout_s=600)
        result.worker_kills += len(killer.killed)
        result.runs += 1
        wait_until_idle(raylet)
    failed = True
    while failed and result.runs < 8:  # the kill budget stays within the retries: one rerun suffices
        with WorkerKiller(raylet, rng, budget=MAX_RETRIES if result.runs < 5 else 0) as killer:
            failed = bool(run_pipeline(parse_config(cfg)).failed)
        result.worker_kills += len(killer.killed)
        result.runs += 1
    result.equal = differences(run_root, reference, image_stages) == []
    result.lost = lost_samples(run_root, reference)
    result.duplicated = duplicated_samples(run_root)
    left = temp_files(run_root)
    result.temp_left = len(left)
    report = verify_run(run_root)
    result.verified = report.ok
    result.notes = tuple(str(p.relative_to(run_root)) for p in left) + tuple(report.problems[:3])
    result.seconds = time.perf_counter() - started
    return result


def toy_rounds(work: Path, seeds: list[int], rows: int, address: str, raylet: int) -> list[Round]:
    pool = work / "toy-pool.parquet"
    pq.write_table(pa.Table.from_pylist([{"url": f"http://127.0.0.1:1/img/{i}.jpg",
                                          "caption": f"{'y' * (i % 29)} {i}"} for i in range(rows)]), pool)
    reference = work / "toy-reference"
    run_pipeline(parse_config(toy_config(reference, pool, "local", None)))
    rounds = []
    for seed in seeds:
        root = work / f"toy-{seed}"
        root.mkdir()
        rounds.append(chaos_round("toy", seed, toy_config(root, pool, "ray", address), reference / "run", root,
                                  raylet, ("render",)))
        print_round(rounds[-1])
    return rounds


def download_rounds(work: Path, seeds: list[int], rows: int, address: str, raylet: int) -> list[Round]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    corpus = work / "corpus"
    synthesize(corpus, n=rows, seed=7, base_url=f"http://127.0.0.1:{port}", seed_size=0, test_per_concept=0)
    rounds = []
    with serve(corpus, port=port):
        reference = work / "download-reference"
        run_pipeline(parse_config(download_config(reference, corpus, "local", None)))
        for seed in seeds:
            root = work / f"download-{seed}"
            root.mkdir()
            rounds.append(chaos_round("download", seed, download_config(root, corpus, "ray", address),
                                      reference / "run", root, raylet, ("download",)))
            print_round(rounds[-1])
    return rounds


HEADER = (f"{'pipeline':<9} {'seed':>4} {'driver':>6} {'worker':>6} {'runs':>4} {'equal':>5} {'lost':>4} "
          f"{'dup':>4} {'tmp':>4} {'verify':>6} {'s':>6}")


def print_round(r: Round) -> None:
    print(f"{r.pipeline:<9} {r.seed:>4} {r.driver_kills:>6} {r.worker_kills:>6} {r.runs:>4} "
          f"{'yes' if r.equal else 'NO':>5} {r.lost:>4} {r.duplicated:>4} {r.temp_left:>4} "
          f"{'ok' if r.verified else 'FAIL':>6} {r.seconds:>6.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6, help="rounds of the toy pipeline")
    parser.add_argument("--download-seeds", type=int, default=3, help="rounds of the download pipeline")
    parser.add_argument("--rows", type=int, default=600, help="toy pool rows (50 per shard)")
    parser.add_argument("--download-rows", type=int, default=1200, help="synthetic web rows (100 per shard)")
    args = parser.parse_args()

    # pairsift's local Ray (token auth; the drivers it starts inherit the token), but without
    # workers' log lines (each kill prints one) over the table
    ray_local.start_ray(None, None, num_cpus=2, log_to_driver=False, logging_level="ERROR")
    import ray

    work = Path(tempfile.mkdtemp(prefix="pairsift-chaos-"))
    try:
        address, raylet = ray.get_runtime_context().gcs_address, our_raylet()
        print("killed per round: 'driver' = driver SIGKILLs, 'worker' = busy Ray workers SIGKILLed\n" + HEADER)
        rounds = toy_rounds(work, list(range(1, args.seeds + 1)), args.rows, address, raylet)
        if args.download_seeds:
            rounds += download_rounds(work, list(range(101, 101 + args.download_seeds)), args.download_rows,
                                      address, raylet)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    # Ray prints a line per killed worker into the table above: print it again, clean.
    print("\n" + HEADER)
    for r in rounds:
        print_round(r)
    for r in rounds:
        for note in r.notes:
            print(f"  {r.pipeline} seed {r.seed}: {note}")
    kills = sum(r.driver_kills + r.worker_kills for r in rounds)
    unequal = sum(not r.equal for r in rounds)
    bad = sum(not r.verified or r.temp_left > 0 for r in rounds)
    print(f"\n{len(rounds)} rounds, {sum(r.driver_kills for r in rounds)} driver kills and "
          f"{sum(r.worker_kills for r in rounds)} worker kills survived; {unequal} rounds differ from the "
          f"uninterrupted run; {bad} rounds fail verify or left temporary files")
    print(f"RESULT name=chaos kills={kills} lost={sum(r.lost for r in rounds)} "
          f"duplicated={sum(r.duplicated for r in rounds)} runs={len(rounds)} unequal={unequal} "
          f"unverified={bad} device=cpu")


if __name__ == "__main__":
    main()
