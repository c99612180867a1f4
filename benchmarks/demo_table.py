"""The README's demo tables, regenerated: run `pairsift demo` for the given sizes and seeds and print
the markdown table (one row per seed and training set), the gain per run, the per-phase wall time
(median over the runs of a size), and where it ran: the commit, nproc, the CPU model, RAM and the
load average before and after (the figures of a shared machine are not an idle machine's).

Each run is a fresh `pairsift demo` process in its own directory; `--repeats 2` runs every (size, seed)
twice, which also shows whether the table is stable (it must be: the demo is deterministic).

Run: .venv/bin/python benchmarks/demo_table.py --sizes tiny --seeds 0 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    """nproc, CPU model, RAM and the load average now, in one line."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()}, {cpu}, {ram_gib:.0f} GiB RAM, load average {load}"


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def run_demo(size: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One `pairsift demo` in a fresh process; its comparison.json."""
    cmd = [sys.executable, "-m", "pairsift.pipeline", "demo", "--size", size, "--seed", str(seed),
           "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((out / "run" / "report" / "comparison.json").read_text())


def pct(x: float | None) -> str:
    return f"{100 * (x or 0):.1f}%"


def results_table(runs: list[dict]) -> list[str]:
    lines = ["| size | seed | run | trained on | pairs | zero-shot top-1 | head top-1 (top ¼ concepts) "
             "| tail top-1 (bottom ½) | image→text R@1 |", "|---|---|---|---|---|---|---|---|---|"]
    for c in runs:
        for row in c["rows"]:
            top1 = pct(row["top1"]) if row["name"] != "curated" else f"**{pct(row['top1'])}**"
            lines.append(f"| {c['size']} | {c['seed']} | {c['repeat']} | {row['name']} | {row['train_samples']:,} "
                         f"| {top1} | {pct(row['head_top1'])} | {pct(row['tail_top1'])} | {pct(row['i2t_r1'])} |")
    return lines


def gains(runs: list[dict]) -> list[str]:
    lines = []
    for c in runs:
        pool, curated = c["rows"][0], c["rows"][-1]
        lines.append(f"- {c['size']}, seed {c['seed']}, run {c['repeat']}: curation "
                     f"{100 * (curated['top1'] - pool['top1']):+.1f} points of zero-shot top-1 "
                     f"({c['samples_seen']:,} samples seen); filter network precision / recall for clean pairs "
                     f"{pct(c['filter']['precision'])} / {pct(c['filter']['recall'])}; {c['seconds']:.0f} s")
    return lines


def phase_table(runs: list[dict]) -> list[str]:
    """Median wall seconds per phase over the runs of each size, and each phase's share of the total."""
    lines = []
    for size in dict.fromkeys(c["size"] for c in runs):
        mine = [c for c in runs if c["size"] == size]
        total = statistics.median(c["seconds"] for c in mine)
        lines += [f"| phase ({size}, median of {len(mine)}) | seconds | share |", "|---|---|---|"]
        for phase in mine[0]["phases"]:
            seconds = statistics.median(c["phases"][phase] for c in mine)
            lines.append(f"| {phase} | {seconds:.1f} | {100 * seconds / total:.0f}% |")
        lines.append(f"| whole demo (incl. start-up, report) | {total:.1f} | 100% |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny", help="comma-separated demo sizes")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (size, seed)")
    ap.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary directory)")
    args, extra = ap.parse_known_args()  # anything else goes to `pairsift demo` (e.g. --threads 2)
    before, code = machine(), commit()
    work = args.keep or Path(tempfile.mkdtemp(prefix="demo-table-"))
    runs = []
    for size in args.sizes.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for repeat in range(1, args.repeats + 1):
                c = run_demo(size, seed, work / f"{size}-seed{seed}-run{repeat}", extra)
                runs.append({**c, "repeat": repeat})
    if args.keep is None:
        shutil.rmtree(work)
    command = "benchmarks/demo_table.py " + " ".join(sys.argv[1:])
    print("\n".join([f"`{command}` at commit {code}", f"machine before: {before}",
                     f"machine after:  {machine()}", "", *results_table(runs), "", *gains(runs), "",
                     *phase_table(runs)]))
    # the repeats of one (size, seed) must agree exactly: one distinct table per (size, seed)
    distinct = {(c["size"], c["seed"], json.dumps([c["rows"], c["filter"]])) for c in runs}
    per_config = {(c["size"], c["seed"]) for c in runs}
    points = [100 * (c["rows"][-1]["top1"] - c["rows"][0]["top1"]) for c in runs]
    print(f"RESULT name=demo_table gain_points_median={statistics.median(points):.1f} runs={len(runs)} "
          f"repeats_identical={int(len(distinct) == len(per_config))} "
          f"seconds_median={statistics.median(c['seconds'] for c in runs):.0f} device=cpu")


if __name__ == "__main__":
    main()
