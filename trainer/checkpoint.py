"""Checkpoints and the files a training run leaves: resume state, the RNG states, the result.

``<out>/checkpoints/step-NNNNNNN.pt`` holds tensors and primitives only (weights_only-safe): model,
optimizer, scaler, step, every rank's RNG states, every reader's cursor and the per-step losses, so
an interrupted run ends where an uninterrupted one would. ``<out>/result.json`` is ``TrainResult``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairsift.common.storage import atomic_path, write_atomic

CKPT_DIR = "checkpoints"
FINAL_DIR = "final"


@dataclass
class TrainResult:
    out_dir: str
    final_dir: str
    steps: int
    samples_seen: int
    losses: list[float] = field(default_factory=list)  # one per step, the whole run (resumes included)
    skipped: dict[str, int] = field(default_factory=dict)
    caption_sources: dict[str, int] = field(default_factory=dict)
    samples_per_s: float = 0.0
    eval: dict[str, Any] | None = None
    world_size: int = 1

    @classmethod
    def load(cls, out_dir: str | Path) -> TrainResult:
        return cls(**json.loads((Path(out_dir) / "result.json").read_text()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/primitives only, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / CKPT_DIR).glob("step-*.pt"))
    return ckpts[-1] if ckpts else None


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> None:
    """Write ``step-NNNNNNN.pt`` and drop all but the ``keep`` newest. A unique temp file beside the
    target (created O_EXCL, so a link planted at a guessable name in a shared output dir is never
    followed), renamed over it when complete: a crash mid-save leaves the previous checkpoint."""
    with atomic_path(out / CKPT_DIR / f"step-{step:07d}.pt") as tmp:
        torch.save(state, tmp)
    for old in sorted((out / CKPT_DIR).glob("step-*.pt"))[:-keep]:
        old.unlink()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state; tensors and primitives only, so it loads with weights_only=True."""
    return torch.load(path, map_location="cpu", weights_only=True)


def truncate_log(out: Path, step: int) -> None:
    """Drop log lines past the step we start from: they will be recomputed."""
    path = out / "log.jsonl"
    if not path.is_file():
        return
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in recs if r["step"] <= step))
