"""`pairsift demo`: does curating make a model better, and by how much? Offline, on a laptop.

1. Synthesize a web corpus (long-tailed concepts, mismatched/boilerplate/duplicate captions, broken
   files, dead links), a clean seed set and a clean balanced test set; serve the pool on 127.0.0.1 at a
   fixed port (it is in every URL, hence in every uid: a fixed one makes two runs of a seed identical).
   Sizes are data: configs/demo/sizes.yaml.
2. Train a small filtering network on the seed set (Data Filtering Networks: the filter is a CLIP
   trained on trusted data) and load it into the clip_score stage by path.
3. Curate the pool with configs/demo.yaml on local Ray: text filter -> download -> image filter ->
   CLIP score + top-fraction filter -> MetaCLIP balancing -> shards.
4. Train the same small CLIP for the same number of samples seen on everything that downloaded and on
   the curated shards; evaluate both on the clean test set.
5. Print one table (and write it for the report), plus the filter's precision and recall against the
   synthetic ground truth. Only the demo reads the ground truth; the pipeline never does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pairsift.configs import CONFIGS_DIR, TINY_MODEL
from pairsift.pipeline.config import load_config
from pairsift.pipeline.errors import UserError

# The corpus's URLs name this port, and every uid hashes its URL, so MetaCLIP's (seed, uid) draws depend
# on it: a fixed port (not a free one picked per run) makes two runs of one seed curate the same pairs.
DEMO_PORT = 8766
DEMO_SIZES_FILE = CONFIGS_DIR / "demo" / "sizes.yaml"


class DemoSize(BaseModel):
    """One entry of configs/demo/sizes.yaml."""

    model_config = ConfigDict(extra="forbid")

    pool: int = Field(gt=0)
    shard_size: int = Field(gt=0)
    n_concepts: int = Field(48, gt=1)
    zipf: float = Field(1.1, gt=0)
    seed_pairs: int = Field(gt=0)
    test_per_concept: int = Field(gt=0)
    filter_steps: int = Field(gt=0)
    train_steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    # torch threads per training. One is the robust default: OpenMP threads wait for each other when
    # one is descheduled, and on a shared 2-core machine 2 threads trained 6x slower than 1. Two are
    # faster on an idle machine (`--threads 2`). Results are exact for a fixed count.
    threads: int = Field(1, gt=0)


def demo_sizes(path: Path = DEMO_SIZES_FILE) -> dict[str, DemoSize]:
    """The named sizes, validated; a malformed file is one UserError naming it."""
    try:
        return TypeAdapter(dict[str, DemoSize]).validate_python(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable demo sizes file ({e})") from None


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to phases[name] (the README's per-phase breakdown comes from these)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def _check_port_free(port: int) -> None:
    """One clear line if the demo's web cannot be served on 127.0.0.1:`port` (taken, or out of range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the HTTP server will: the last run's connections in TIME_WAIT do not make the port taken
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except (OSError, OverflowError) as e:
            raise UserError(f"cannot serve the demo on 127.0.0.1:{port} ({getattr(e, 'strerror', None) or e}); "
                            "pick another port with --port") from None


def _train(data: Path, out: Path, steps: int, batch_size: int, seed: int, threads: int) -> Path:
    from pairsift.trainer.config import build_config
    from pairsift.trainer.train import train

    # data.workers=1: a DataLoader worker decodes the next batches on the second core while this process
    # trains (in-process, the loader was 43% of a training's time); the batches are the same as with none.
    cfg = build_config({
        "out": str(out), "model": str(TINY_MODEL), "data": {"train": str(data), "workers": 1}, "steps": steps,
        "batch_size": batch_size, "lr": 0.002, "warmup": min(50, steps // 10), "weight_decay": 0.2,
        "threads": threads, "seed": seed, "progress": True, "checkpoint_every": 0,
    })
    return Path(train(cfg).final_dir)


def _write_pool_sizes(run_dir: Path) -> Path:
    """Everything that downloaded is already a webdataset (the download stage's tars): add sizes.json."""
    from pairsift.pipeline.run_dir import RunDir, shard_of

    run, sizes = RunDir(run_dir), {}
    for tar in run.image_tars("download"):
        done = run.read_done(run.part("download", shard_of(tar)))
        sizes[tar.name] = done.kept if done else 0
    (run.stage_dir("download") / "sizes.json").write_text(json.dumps(sizes))
    return run.stage_dir("download")


def _samples_in(data: Path) -> int:
    from pairsift.trainer.data import expand_shards, shard_sizes

    return sum(shard_sizes(expand_shards(str(data))))


def _head_tail(result: dict[str, Any], order: list[str]) -> tuple[float, float]:
    """Mean zero-shot accuracy over the most frequent quarter and the least frequent half of concepts."""
    per_class = result.get("per_class", {})
    quarter, half = max(1, len(order) // 4), max(1, len(order) // 2)
    head = [per_class[c] for c in order[:quarter] if c in per_class]
    tail = [per_class[c] for c in order[-half:] if c in per_class]
    return sum(head) / max(1, len(head)), sum(tail) / max(1, len(tail))


def truth_by_uid(run_dir: Path, corpus: Path) -> dict[str, str]:
    """The ground-truth defect of every row, keyed by the uid ingest gave it (ingest keeps input order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pairsift.pipeline.run_dir import RunDir

    run = RunDir(run_dir)
    parts = run.parts("ingest")
    uids = pa.concat_tables([pq.read_table(p, columns=["uid"]) for p in parts]).column("uid").to_pylist()
    truth = pq.read_table(corpus / "ground_truth.parquet", columns=["row", "defect"]).sort_by("row")
    return dict(zip(uids, truth.column("defect").to_pylist()))


def filter_quality(run_dir: Path, corpus: Path) -> dict[str, float]:
    """Precision and recall of the CLIP filter for clean pairs, among the rows that reached it."""
    from pairsift.pipeline.catalog import query

    defect = truth_by_uid(run_dir, corpus)
    _, rows = query(run_dir, "SELECT uid, reason IS NULL FROM clip_filter")
    clean = [kept for uid, kept in rows if defect.get(uid) == "none"]
    kept = sum(1 for _, k in rows if k)
    true_positive = sum(clean)
    return {"precision": true_positive / kept if kept else 0.0,
            "recall": true_positive / len(clean) if clean else 0.0}


def ablation_run(cfg, run_dir: Path, drop_label: str, out: Path):
    """The same curation without one stage, computed from the finished run: its common stage prefix is
    hard-linked into a new run directory, so resume recomputes only what differs (and the shards)."""
    from pairsift.pipeline.runner import run_pipeline

    stages = [s for s in cfg.stages if s.label != drop_label]
    variant = cfg.model_copy(update={"run_dir": str(out), "stages": stages})
    shared = ["ingest"]
    for kept, original in zip(stages, cfg.stages):
        if kept.label != original.label:
            break
        shared.append(kept.label)
    for label in shared:
        if (run_dir / label).exists() and not (out / label).exists():
            shutil.copytree(run_dir / label, out / label, copy_function=os.link)
    if not (out / "run.json").exists():  # what makes it a run directory the runner will write into
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "run.json", out / "run.json")
    run_pipeline(variant)
    return out / "shards"


def run_demo(out: Path, size: str = "default", seed: int = 0, executor: str = "ray",
             threads: int | None = None, ablations: bool = False, port: int = DEMO_PORT) -> dict[str, Any]:
    from pairsift.pipeline.report_text import console, print_funnel, print_summary
    from pairsift.pipeline.runner import run_pipeline
    from pairsift.pipeline.serve import serve
    from pairsift.pipeline.synth import synthesize
    from pairsift.trainer.eval import evaluate_checkpoint

    sizes = demo_sizes()
    if size not in sizes:
        raise UserError(f"unknown demo size {size!r}; sizes: {', '.join(sizes)}")
    plan = sizes[size]
    if threads is not None:
        plan = plan.model_copy(update={"threads": threads})
    corpus, run_dir, models = out / "corpus", out / "run", out / "models"
    started, phases = time.perf_counter(), {}
    if corpus.exists():  # a demo is a fresh experiment: a new seed or size must not reuse an old pool
        shutil.rmtree(out)
    _check_port_free(port)  # fail in a second, not after synthesis and the filter training
    console.print(f"[1/5] synthesizing a {plan.pool:,}-pair web corpus, a clean seed set and a test set in {corpus}")
    with _timed(phases, "synthesize"):
        summary = synthesize(corpus, n=plan.pool, seed=seed, base_url=f"http://127.0.0.1:{port}",
                             n_concepts=plan.n_concepts, zipf=plan.zipf, seed_size=plan.seed_pairs,
                             test_per_concept=plan.test_per_concept)
        (corpus / "metadata.txt").write_text("\n".join(summary.concepts) + "\n")

    console.print(f"[2/5] training the filter network on {plan.seed_pairs:,} clean seed pairs")
    with _timed(phases, "train filter network"):
        filter_net = _train(corpus / "seed", models / "filter-network", plan.filter_steps, plan.batch_size, seed,
                            plan.threads)

    with serve(corpus, port=port) as server, _timed(phases, "serve + curate (Ray)"):
        console.print(f"[3/5] curating the pool served at {server.url} with configs/demo.yaml on {executor}")
        cfg = load_config("demo", {
            "run_dir": str(run_dir), "input.path": str(corpus / "urls.parquet"),
            "input.shard_size": plan.shard_size, "executor.kind": executor,
            "stages.clip_score.model": str(filter_net), "stages.balance.metadata": str(corpus / "metadata.txt"),
            "stages.balance.seed": seed,
            "stages.download.allow_loopback": True,  # its own web on 127.0.0.1; never in the preset
        })
        run = run_pipeline(cfg)
    print_summary(run)
    print_funnel(run_dir)

    trainings = [("pool (everything downloaded)", _write_pool_sizes(run_dir))]
    if ablations:
        with serve(corpus, port=port):  # the variants reuse every download; nothing is fetched again
            trainings += [("filter-only", ablation_run(cfg, run_dir, "balance", out / "ablation-filter-only")),
                          ("balance-only", ablation_run(cfg, run_dir, "clip_filter", out / "ablation-balance-only"))]
    trainings.append(("curated", run_dir / "shards"))
    rows = []
    for number, (name, data) in enumerate(trainings, start=1):
        console.print(f"[{4 if number < len(trainings) else 5}/5] training the same CLIP for {plan.train_steps} "
                      f"steps x {plan.batch_size} on {name}, then evaluating on the clean test set")
        with _timed(phases, f"train on {name.split()[0]}"):
            final = _train(data, models / name.split()[0], plan.train_steps, plan.batch_size, seed, plan.threads)
        with _timed(phases, f"evaluate {name.split()[0]}"):
            result = evaluate_checkpoint(final, corpus / "test")
        head, tail = _head_tail(result, summary.zipf_order)
        rows.append({"name": name.split()[0], "train_samples": _samples_in(data),
                     "top1": result["top1"], "head_top1": head, "tail_top1": tail, "i2t_r1": result.get("i2t_r1")})
    quality = filter_quality(run_dir, corpus)
    comparison = {"rows": rows, "filter": quality, "size": size, "seed": seed,
                  "samples_seen": plan.train_steps * plan.batch_size, "seconds": time.perf_counter() - started,
                  "phases": phases}
    (run_dir / "report").mkdir(parents=True, exist_ok=True)
    (run_dir / "report" / "comparison.json").write_text(json.dumps(comparison, indent=2))
    print_comparison(comparison)
    _write_report(run_dir)
    return comparison


def print_comparison(comparison: dict[str, Any]) -> None:
    from rich.table import Table

    from pairsift.pipeline.report_text import console

    table = Table("trained on", "pairs", "zero-shot top-1", "head top-1", "tail top-1", "image→text R@1",
                  title=f"same model, same {comparison['samples_seen']:,} samples seen, clean test set")
    for row in comparison["rows"]:
        table.add_row(row["name"], f"{row['train_samples']:,}", f"{100 * row['top1']:.1f}%",
                      f"{100 * row['head_top1']:.1f}%", f"{100 * row['tail_top1']:.1f}%",
                      f"{100 * (row['i2t_r1'] or 0):.1f}%")
    console.print(table)
    pool, curated = comparison["rows"][0], comparison["rows"][-1]
    console.print(f"curation: {100 * (curated['top1'] - pool['top1']):+.1f} points of zero-shot top-1")
    if comparison["filter"]:
        console.print(f"filter network vs ground truth (clean pairs, among rows it scored): precision "
                      f"{100 * comparison['filter']['precision']:.1f}%, recall {100 * comparison['filter']['recall']:.1f}%")
    console.print(f"demo finished in {comparison['seconds']:.0f}s")


def _write_report(run_dir: Path) -> None:
    from pairsift.pipeline.cli import write_report_quietly

    write_report_quietly(run_dir)
