"""Build an open_clip model from a name, a model-config JSON or a local-dir, and export one.

The export is open_clip's own local-dir format (``open_clip_config.json`` with ``model_cfg`` and
``preprocess_cfg``, plus ``open_clip_model.safetensors``), so ``create_model_and_transforms(
"local-dir:<dir>")`` and the clip_score stage load it with no pairsift code involved.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pairsift.common.clip_models import CONFIG_NAME, DIR_CHECKPOINTS, LOCAL_DIR
from pairsift.trainer.config import ConfigError

WEIGHTS_NAME = DIR_CHECKPOINTS[0]


@dataclass
class ModelBundle:
    model: torch.nn.Module
    name: str  # what open_clip knows it by: a registered name or "local-dir:<dir>"
    model_cfg: dict[str, Any]
    train_transform: Any
    val_transform: Any
    tokenizer: Any

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        import open_clip

        return _jsonable(open_clip.get_model_preprocess_cfg(self.model))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=list))


def resolve_name(spec: str) -> tuple[str, dict[str, Any]]:
    """(name open_clip accepts, its model config) for a name, a *.json config or a local dir."""
    import open_clip

    if spec.startswith(LOCAL_DIR) or Path(spec).is_dir():
        d = Path(spec.removeprefix(LOCAL_DIR))
        cfg_file = d / CONFIG_NAME
        if not cfg_file.is_file():
            raise ConfigError(f"model directory {d} has no {CONFIG_NAME}")
        return LOCAL_DIR + str(d), json.loads(cfg_file.read_text())["model_cfg"]
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"model config not found: {spec}")
        open_clip.add_model_config(path)
        spec = path.stem
    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        known = ", ".join(open_clip.list_models()[:8])
        raise ConfigError(f"unknown open_clip model '{spec}' (e.g. {known}, ...; or a model-config .json path)")
    return spec, copy.deepcopy(cfg)


def build_model(spec: str, pretrained: str | None = None, loss: str = "clip",
                device: str | torch.device = "cpu") -> ModelBundle:
    """A model ready to train: random init unless ``pretrained`` (a local file) or a local-dir spec."""
    import open_clip

    name, model_cfg = resolve_name(spec)
    kwargs: dict[str, Any] = {}
    if loss == "siglip" and "init_logit_bias" not in model_cfg and not name.startswith(LOCAL_DIR):
        # SigLIP's published init (open_clip_train does the same with --siglip)
        kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    if pretrained is not None and not Path(pretrained).is_file():
        raise ConfigError(f"pretrained checkpoint not found: {pretrained} (only local files load offline)")
    model, train_tf, val_tf = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, **kwargs)
    if loss == "siglip" and getattr(model, "logit_bias", None) is None:
        raise ConfigError(f"loss 'siglip' needs a model with a logit_bias; '{spec}' has none")
    model_cfg.update(kwargs)
    return ModelBundle(model, name, model_cfg, train_tf, val_tf, open_clip.get_tokenizer(name))


def export_local_dir(model: torch.nn.Module, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any],
                     out_dir: Path) -> Path:
    """Write open_clip's local-dir format atomically (temp dir, then rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME))
    cfg = {"model_cfg": _jsonable(model_cfg), "preprocess_cfg": _jsonable(preprocess_cfg)}
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_local_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
    """(model in eval mode, val transform, tokenizer) from a directory ``export_local_dir`` wrote,
    through the same strict loader clip_score uses."""
    from pairsift.common.clip_models import load_clip

    d = Path(str(path).removeprefix(LOCAL_DIR))
    if not (d / CONFIG_NAME).is_file():
        raise ConfigError(f"{d} is not a model checkpoint directory (no {CONFIG_NAME})")
    try:
        return load_clip(LOCAL_DIR + str(d), device=str(device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
