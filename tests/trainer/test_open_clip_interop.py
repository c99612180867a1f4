"""Pipeline-style shards train with open_clip's own trainer, and its checkpoint seeds ours."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from synth_shards import TINY, tiny_config

from pairsift.trainer.config import build_config
from pairsift.trainer.train import train

SHIM = Path(__file__).with_name("open_clip_train_shim.py")


def test_open_clip_train_runs_on_pipeline_shards_and_our_trainer_continues(corpus, tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, str(SHIM), TINY, "--",
           "--train-data", str(corpus / "train" / "{00000..00007}.tar"), "--dataset-type", "webdataset",
           "--model", "tiny-vit", "--device", "cpu", "--precision", "fp32", "--batch-size", "32",
           "--workers", "1", "--epochs", "1", "--train-num-samples", "128", "--logs", str(logs),
           "--name", "interop", "--log-every-n-steps", "1", "--report-to", "none", "--seed", "0",
           "--lr", "1e-3", "--warmup", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = (logs / "interop" / "out.log").read_text() if (logs / "interop" / "out.log").is_file() else ""
    assert proc.returncode == 0, (proc.stderr or proc.stdout)[-3000:]
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+) \(", log)]
    assert len(losses) == 4  # 128 samples / batch 32: every step read real samples from the shards
    assert all(0 < x < 10 for x in losses)
    ckpt = logs / "interop" / "checkpoints" / "epoch_1.pt"
    assert ckpt.is_file()

    # its checkpoint is a valid `pretrained` for our trainer (open_clip loads it weights_only)
    import torch

    from pairsift.trainer.model import build_model

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    loaded = build_model(TINY, pretrained=str(ckpt)).model.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in loaded)
    ours = train(build_config(tiny_config(tmp_path / "ours", corpus / "train", steps=2, pretrained=str(ckpt))))
    assert len(ours.losses) == 2 and all(0 < x < 10 for x in ours.losses)
