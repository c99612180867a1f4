"""The training config: YAML validated with pydantic before anything heavy starts.

Unknown keys are errors. ``batch_size`` is the GLOBAL batch (samples per optimizer step across every
rank and accumulation step), so changing the launcher or process count never changes the math.
Mistakes surface as one line (``ConfigError``, a ``ValueError``) naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pairsift.common.overrides import OverrideError, set_dotted
from pairsift.common.overrides import parse_overrides as overrides_of


class ConfigError(ValueError):
    """A training config a user can fix; its message is one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaptionConfig(Strict):
    """Which of a sample's captions is used each time it is drawn.

    ``uniform`` (LaCLIP): every caption the sample carries (alt-text, each rewrite, the enriched
    caption) is equally likely. ``weighted`` (VeCLIP-style mixing): a source is drawn with probability
    proportional to its weight among the sources the sample has, then uniformly within the source."""

    strategy: Literal["uniform", "weighted"] = "uniform"
    alt: float = Field(1.0, ge=0)
    rewrites: float = Field(1.0, ge=0)
    enriched: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> CaptionConfig:
        if self.strategy == "weighted" and self.alt + self.rewrites + self.enriched <= 0:
            raise ValueError("captions: at least one of alt/rewrites/enriched needs a positive weight")
        return self


class DataConfig(Strict):
    train: str = Field(description="shard directory or brace pattern, e.g. 'shards/{00000..00003}.tar'")
    workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (0 = in-process)")
    readers: int | None = Field(
        None, gt=0, description="logical shard readers in total; default world_size × max(1, workers). "
        "Fix it to get identical batches across launchers and worker counts.")
    shuffle_shards: int = Field(4, gt=0, description="shards whose samples are shuffled together")
    captions: CaptionConfig = CaptionConfig()
    use_keep_prob: bool = Field(True, description="re-draw samples each epoch by their json keep_prob")


class EvalConfig(Strict):
    data: str = Field(description="held-out webdataset dir/pattern or image folder")
    every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")
    batch_size: int = Field(256, gt=0)
    max_samples: int | None = Field(None, gt=0)


class RayLaunch(Strict):
    address: str | None = Field(None, description="join this Ray cluster; None starts Ray on loopback")
    node_ip: str = "127.0.0.2"
    auth_mode: Literal["disabled", "token"] | None = Field(
        None, description="None: token auth with a fresh token for a local Ray, the exported RAY_AUTH_MODE "
                          "when joining; disabled: an explicit opt-out")


class TrainConfig(Strict):
    out: str = Field(description="output directory: checkpoints/, final/, log.jsonl, eval.jsonl")
    data: DataConfig
    model: str = Field(description="open_clip model name, model-config JSON path, or local-dir:<dir>")
    pretrained: str | None = Field(None, description="local checkpoint file; None = random init")
    loss: Literal["clip", "siglip"] = "clip"
    local_loss: bool = True
    gather_with_grad: bool = True

    batch_size: int = Field(256, gt=0, description="global samples per optimizer step")
    accum_steps: int = Field(1, gt=0, description="micro-batches per step (features cached, exact)")
    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0, description="alternative to steps, from sizes.json")

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup: int = Field(0, ge=0, description="linear warmup steps before the cosine decay")
    grad_clip: float | None = Field(None, gt=0)

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPU, fp32 on CPU; bf16/fp16 autocast need a GPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    grad_checkpointing: bool = False
    threads: int | None = Field(None, gt=0, description="torch.set_num_threads per process")
    seed: int = 0

    checkpoint_every: int = Field(0, ge=0, description="resume checkpoint every N steps (0 = end only)")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    progress: bool = True
    eval: EvalConfig | None = None

    launcher: Literal["local", "torchrun", "ray"] = "local"
    nproc: int = Field(1, gt=0, description="processes for torchrun / Ray Train workers")
    ray: RayLaunch = RayLaunch()

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' or 'epochs'")
        return self


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["steps=10", "data.workers=2"]`` -> a dict of dotted keys to YAML-parsed values."""
    try:
        return overrides_of(overrides)
    except OverrideError as exc:
        raise ConfigError(str(exc)) from None


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    raw = dict(raw)
    try:
        for key, value in (overrides or {}).items():
            set_dotted(raw, key, value)
    except OverrideError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"train config: {_one_line(err)}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return build_config(raw, overrides)
