"""Run the ``rewrite`` stage through the real vLLM engine; executed with ``.venv-vllm/bin/python``.

The main venv has no vllm (its torch differs), so the test in tests/stages/test_recaption.py hands
this script a job file and reads the results back:

    job.json = {"engine": {EngineConfig fields}, "input": "<parquet with uid, caption>",
                "runs": [{"config": {RewriteConfig fields but engine}, "output": "<parquet>"}]}

One engine serves every run (vLLM's start-up dominates on CPU); each run writes the stage's output
table and ``<output>.json`` with the generation counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(job_path: str) -> None:
    import pyarrow.parquet as pq

    from pairsift.stages.engines import EngineConfig, make_engine
    from pairsift.stages.rewrite import Rewrite, RewriteConfig

    job = json.loads(Path(job_path).read_text())
    engine_cfg = EngineConfig(**job["engine"])
    began = time.perf_counter()
    engine = make_engine(engine_cfg)
    load_s = time.perf_counter() - began
    table = pq.read_table(job["input"])
    for run in job["runs"]:
        stage = Rewrite(RewriteConfig(engine=engine_cfg, **run["config"]))
        stage.engine = engine  # setup() would start a second vLLM engine
        out = stage(table)
        pq.write_table(out, run["output"])
        stats = {
            "prompts": stage.meter.prompts,
            "tokens": stage.meter.tokens,
            "seconds": stage.meter.seconds,
            "load_s": load_s,
            "flags": dict(stage.meter.flags),
        }
        Path(run["output"] + ".json").write_text(json.dumps(stats))


if __name__ == "__main__":  # vLLM spawns worker processes: nothing may run at import
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main(sys.argv[1])
