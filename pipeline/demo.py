"""`pairsift demo`: synthesize a web corpus, serve it on 127.0.0.1 and curate it end to end.

Sizes are data: how many pool rows each size draws. The demo prints where the shards, the catalog
and the funnel are, and how the funnel compares with the corpus's ground truth (which only the demo
reads: the pipeline never does).
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import load_config
from pipeline.errors import UserError


class DemoSize(BaseModel):
    pool: int
    shard_size: int


DEMO_SIZES = {
    "small": DemoSize(pool=3_000, shard_size=1_000),
    "default": DemoSize(pool=20_000, shard_size=2_500),
    "large": DemoSize(pool=100_000, shard_size=10_000),
}


def run_demo(out: Path, size: str = "default", seed: int = 0, executor: str = "ray") -> Path:
    from pipeline.report_text import console, print_funnel, print_summary
    from pipeline.runner import run_pipeline
    from pipeline.serve import free_port, serve
    from pipeline.synth import synthesize

    if size not in DEMO_SIZES:
        raise UserError(f"unknown demo size {size!r}; sizes: {', '.join(DEMO_SIZES)}")
    plan = DEMO_SIZES[size]
    corpus, run_dir = out / "corpus", out / "run"
    port = free_port()
    started = time.perf_counter()
    console.print(f"[1/2] synthesizing a {plan.pool:,}-pair web corpus in {corpus} ...")
    synthesize(corpus, n=plan.pool, seed=seed, base_url=f"http://127.0.0.1:{port}")
    with serve(corpus, port=port) as server:
        console.print(f"[2/2] serving it at {server.url}; curating with configs/demo.yaml on local Ray ...")
        cfg = load_config("demo", {"run_dir": str(run_dir), "input.path": str(corpus / "urls.parquet"),
                                   "input.shard_size": plan.shard_size, "executor.kind": executor})
        summary = run_pipeline(cfg)
    print_summary(summary)
    print_funnel(run_dir)
    console.print(f"done in {time.perf_counter() - started:.0f}s. ground truth (never read by the pipeline): "
                  f"{corpus / 'ground_truth.parquet'}")
    return run_dir
