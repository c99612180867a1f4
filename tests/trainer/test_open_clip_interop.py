"""open_clip's own trainer, unmodified (``python -m open_clip_train.main``), trains on a real run's shards.

The run is real: a synthetic web served on 127.0.0.1, the demo preset's spine on Ray, its ``shards/``
folder as the trainer gets it. open_clip_train is given a pairsift-trained model (``local-dir:``) or one of
its own architectures with random weights, and its checkpoint then seeds our trainer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synth_shards import TINY, tiny_config

from pairsift.pipeline.config import CONFIGS_DIR, parse_config
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.synth import synthesize
from pairsift.trainer.config import build_config
from pairsift.trainer.train import train

pytestmark = pytest.mark.slow  # a real run on Ray, then four trainings

BATCH = 16
SAMPLES = 64  # passed as --train-num-samples: works whatever size file the shards folder holds


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """(the run's shards folder, a pairsift model trained on them, as ``<out>/final``)."""
    root = tmp_path_factory.mktemp("interop")
    port = free_port()
    synthesize(root / "corpus", n=300, seed=5, base_url=f"http://127.0.0.1:{port}", seed_size=48,
               test_per_concept=1)
    data = yaml.safe_load((CONFIGS_DIR / "demo.yaml").read_text())
    data["stages"] = [s for s in data["stages"] if s["stage"] in ("text_filter", "download", "image_filter")]
    next(s for s in data["stages"] if s["stage"] == "download")["allow_loopback"] = True  # as `demo` sets it
    data.update(run_dir=str(root / "run"), shards={"samples_per_shard": 50})
    data["input"].update(path=str(root / "corpus/urls.parquet"), shard_size=150)
    with serve(root / "corpus", port=port):
        summary = run_pipeline(parse_config(data))
    assert not summary.failed and summary.samples_written >= SAMPLES
    shards = root / "run" / "shards"
    ours = train(build_config(tiny_config(root / "ours", shards, steps=2)))
    return shards, Path(ours.final_dir)


def open_clip_train(shards: Path, logs: Path, name: str, model_args: list[str], *extra: str) -> list[float]:
    """Run the unmodified ``open_clip_train.main`` for one epoch on CPU; its per-step losses."""
    tars = sorted(p.name for p in shards.glob("*.tar"))
    pattern = str(shards / f"{{{tars[0][:-4]}..{tars[-1][:-4]}}}.tar")
    cmd = [sys.executable, "-m", "open_clip_train.main", "--train-data", pattern, "--dataset-type", "webdataset",
           *model_args, "--device", "cpu", "--precision", "fp32", "--batch-size", str(BATCH), "--workers", "1",
           "--epochs", "1", "--train-num-samples", str(SAMPLES), "--logs", str(logs), "--name", name,
           "--log-every-n-steps", "1", "--report-to", "none", "--seed", "0", "--lr", "1e-4", "--warmup", "1",
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=logs.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stderr or proc.stdout)[-3000:]
    log = (logs / name / "out.log").read_text()
    assert (logs / name / "checkpoints" / "epoch_1.pt").is_file()
    return [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+) \(", log)]


@pytest.mark.parametrize("resampled", [False, True], ids=["plain", "resampled"])
def test_open_clip_train_trains_a_pairsift_model_on_a_runs_shards(real_run, tmp_path, resampled):
    shards, final = real_run
    extra = ["--dataset-resampled"] if resampled else []
    losses = open_clip_train(shards, tmp_path / "logs", "ours", ["--model", f"local-dir:{final}"], *extra)
    assert len(losses) == SAMPLES // BATCH  # every step read a full batch of real samples from the shards
    assert all(0 < x < 10 for x in losses)


def test_open_clip_train_trains_its_own_architecture_from_random_weights(real_run, tmp_path):
    shards, _ = real_run
    losses = open_clip_train(shards, tmp_path / "logs", "arch", ["--model", "ViT-S-32-alt", "--pretrained", ""])
    assert len(losses) == SAMPLES // BATCH and all(0 < x < 10 for x in losses)


def test_open_clip_train_checkpoint_seeds_our_trainer(real_run, tmp_path):
    import torch

    from pairsift.trainer.model import build_model

    shards, final = real_run
    open_clip_train(shards, tmp_path / "logs", "seed", ["--model", f"local-dir:{final}"])
    ckpt = tmp_path / "logs" / "seed" / "checkpoints" / "epoch_1.pt"
    # open_clip loads it weights_only, and so do we
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    loaded = build_model(TINY, pretrained=str(ckpt)).model.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in loaded)
    ours = train(build_config(tiny_config(tmp_path / "ours", shards, steps=2, pretrained=str(ckpt))))
    assert len(ours.losses) == 2 and all(0 < x < 10 for x in ours.losses)
