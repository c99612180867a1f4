"""Training throughput: pairsift's trainer vs open_clip_train.main, same shards/model/batch/precision.

Both train the same model on the same synthetic pipeline-style shards with the same global batch,
precision, DataLoader workers and torch threads; each reports its steady-state samples/s (first
steps dropped: start-up, first shard index); runs alternate and the medians are compared. The data loader alone is timed too: it must outrun the
training step, or the trainer waits on data.

    python benchmarks/train.py                 # CPU: tiny ViT, batch 256, fp32, 1 worker, cores-1 threads
    python benchmarks/train.py --steps 60 --batch 128
On a CUDA machine it defaults to ViT-B-32, bf16 autocast, 224 px, batch 256, 8 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainer"))  # the synthetic shard writer shared with the tests

import torch  # noqa: E402
from synth_shards import write_shards  # noqa: E402

from pairsift.trainer.config import build_config  # noqa: E402
from pairsift.trainer.train import train  # noqa: E402

TINY = REPO / "configs" / "models" / "tiny-vit.json"


def steady_rate(step_times: list[float], batch: int, skip: int) -> float:
    """samples/s over steps after the first ``skip`` (per-step wall times in seconds)."""
    times = step_times[skip:]
    return batch * len(times) / sum(times)


def run_ours(shards: Path, out: Path, a: argparse.Namespace) -> float:
    cfg = build_config({
        "out": str(out), "model": a.model, "data": {"train": str(shards), "workers": a.workers},
        "batch_size": a.batch, "steps": a.steps, "lr": 1e-3, "warmup": 1, "threads": a.threads,
        "precision": a.precision, "progress": False, "log_every": 1, "seed": 0,
    })
    train(cfg)
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    # log.jsonl holds cumulative samples/s per step: recover each step's wall time from it
    elapsed = [r["step"] * a.batch / r["samples_per_s"] for r in recs]
    step_times = [elapsed[0]] + [b - c for b, c in zip(elapsed[1:], elapsed)]
    return steady_rate(step_times, a.batch, a.skip)


def open_clip_model_args(model: str, scratch: Path) -> list[str]:
    """open_clip_train knows only its own architectures and local dirs: a model-config JSON of ours
    travels as a local dir holding just its ``open_clip_config.json`` (random weights, as ours start)."""
    if not model.endswith(".json"):
        return ["--model", model]
    local = scratch / f"{Path(model).stem}-config"
    local.mkdir(parents=True, exist_ok=True)
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(Path(model).read_text())}))
    return ["--model", f"local-dir:{local}"]


def run_open_clip_train(shards: Path, logs: Path, a: argparse.Namespace, num_shards: int) -> float:
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "auto": "amp_bf16" if a.cuda else "fp32"}[a.precision]
    cmd = [sys.executable, "-m", "open_clip_train.main",
           "--train-data", str(shards / f"{{00000..{num_shards - 1:05d}}}.tar"), "--dataset-type", "webdataset",
           *open_clip_model_args(a.model, logs.parent), "--device", "cuda" if a.cuda else "cpu",
           "--precision", precision,
           "--batch-size", str(a.batch), "--workers", str(max(1, a.workers)), "--epochs", "1",
           "--train-num-samples", str(a.batch * a.steps), "--logs", str(logs), "--name", "bench",
           "--log-every-n-steps", "1", "--report-to", "none", "--seed", "0", "--lr", "1e-3", "--warmup", "1"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log_file = logs / "bench" / "out.log"
    log = log_file.read_text() if log_file.is_file() else ""
    if proc.returncode != 0:
        raise SystemExit(f"open_clip_train failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    step_times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    return steady_rate(step_times, a.batch, a.skip)


def run_loader(shards: Path, a: argparse.Namespace) -> float:
    from pairsift.trainer.config import CaptionConfig
    from pairsift.trainer.data import StreamSpec, TrainLoader, TrainTransform, expand_shards, shard_sizes
    from pairsift.trainer.model import build_model

    torch.set_num_threads(a.threads)
    bundle = build_model(a.model)
    files = expand_shards(str(shards))
    readers = max(1, a.workers)
    spec = StreamSpec(files, shard_sizes(files), readers, a.batch // readers, 0, 4, CaptionConfig())
    loader = TrainLoader(spec, 1, 0, a.workers, None, TrainTransform(bundle.preprocess_cfg), bundle.tokenizer)
    for _ in range(a.skip):
        loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loader.next_batch()
    rate = a.steps * a.batch / (time.perf_counter() - t0)
    loader.close()
    return rate


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32" if cuda else str(TINY))
    p.add_argument("--image-size", type=int, default=224 if cuda else 32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the rates")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores - workers)")
    p.add_argument("--workers", type=int, default=8 if cuda else 1)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--samples", type=int, default=16 * 640)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians reported")
    a = p.parse_args()
    a.cuda = cuda
    if a.threads is None:  # one core per DataLoader worker, the rest for the step: no oversubscription
        a.threads = max(1, (os.cpu_count() or 2) - a.workers)
    device = torch.cuda.get_device_name() if cuda else "cpu"

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        per_shard = a.samples // 16
        write_shards(tmp / "shards", a.samples, per_shard, seed=0, image_size=a.image_size)
        print(f"wrote {a.samples} samples ({a.image_size}px) in 16 shards: {time.perf_counter() - t0:.1f}s")
        loader = run_loader(tmp / "shards", a)
        ours_runs, theirs_runs = [], []
        for r in range(a.repeats):  # alternate, so drifting machine load hits both alike
            ours_runs.append(run_ours(tmp / "shards", tmp / f"ours-{r}", a))
            theirs_runs.append(run_open_clip_train(tmp / "shards", tmp / f"oc-logs-{r}", a, 16))
            print(f"repeat {r + 1}: ours {ours_runs[-1]:,.0f} samples/s, open_clip_train {theirs_runs[-1]:,.0f}")

    ours, theirs = statistics.median(ours_runs), statistics.median(theirs_runs)
    ratio = ours / theirs
    model = Path(a.model).stem
    print()
    print(f"model {model}, batch {a.batch}, {a.steps} steps (first {a.skip} dropped, median of {a.repeats}), "
          f"precision "
          f"{a.precision}, threads {a.threads}, workers {a.workers}, device {device}")
    print(f"{'':28}{'samples/s':>12}")
    print(f"{'pairsift trainer':28}{ours:>12,.0f}")
    print(f"{'open_clip_train.main':28}{theirs:>12,.0f}")
    print(f"{'pairsift data loader alone':28}{loader:>12,.0f}")
    print(f"{'ratio (ours / open_clip)':28}{ratio:>12.2f}")
    print(f"RESULT name=train ratio={ratio:.3f} ours_samples_per_s={ours:.1f} "
          f"open_clip_train_samples_per_s={theirs:.1f} loader_samples_per_s={loader:.1f} "
          f"model={model} batch={a.batch} device={device.replace(' ', '_')}")


if __name__ == "__main__":
    main()
