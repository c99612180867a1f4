"""Loading open_clip models for inference, offline-safe: a name, a model-config JSON, or a trainer /
open_clip local-dir, plus weights from a pretrained tag or a local checkpoint (``weights_only`` or
safetensors: a checkpoint cannot run code). One place for clip_score, concept tags and the trainer's eval.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LOCAL_DIR = "local-dir:"
CONFIG_NAME = "open_clip_config.json"  # open_clip's local-dir format: model_cfg + preprocess_cfg
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Weight files a trainer / open_clip local-dir may hold, most preferred first.
DIR_CHECKPOINTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
PRECISIONS = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------------- model loading


def worker_device(requested: str, who: str) -> str:
    """The torch device for ``requested`` (auto/cpu/cuda), decided on the worker that will use it:
    the driver's view of GPUs says nothing about this process's."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{who}: device 'cuda' requested but this worker sees no CUDA device")
    return requested


def looks_like_path(value: str) -> bool:
    return os.path.exists(value) or "/" in value or os.sep in value or value.endswith(CHECKPOINT_SUFFIXES)


def _is_local_dir(model: str) -> bool:
    return model.startswith(LOCAL_DIR) or os.path.isdir(model)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors or a torch file (``weights_only=True``: tensors and plain
    containers only, so a checkpoint cannot run code). Accepts ``{"state_dict": ...}`` and strips a
    DistributedDataParallel ``module.`` prefix."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "not plain tensors")
        raise ValueError(
            f"refusing to load checkpoint {path}: unpickling it would need arbitrary code ({why}); "
            "save a plain state_dict (torch.save(model.state_dict())) or .safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated files: one line for the user
        raise ValueError(f"cannot read checkpoint {path}: {' '.join(str(exc).split())[:200]}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if (
        not isinstance(loaded, dict)
        or not loaded
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise ValueError(f"checkpoint {path} holds no state_dict (expected parameter names -> tensors)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _fit_state_dict(
    net: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: Path, arch: str
) -> None:
    """Load ``state`` strictly; a mismatch is one line naming checkpoint, architecture and first key."""
    expected = net.state_dict()
    for key in ("logit_scale", "logit_bias"):  # scalar vs [1] differs between open_clip versions
        if key in state and key in expected and state[key].numel() == expected[key].numel():
            state[key] = state[key].reshape(expected[key].shape)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        if mismatched:
            key = mismatched[0]
            first = f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
        elif missing:
            first = f"missing {missing[0]}"
        else:
            first = f"unexpected {unexpected[0]}"
        raise ValueError(
            f"checkpoint {checkpoint} does not fit architecture {arch}: {first} "
            f"({len(mismatched)} shape mismatches, {len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    net.load_state_dict(state, strict=True)


def _read_model_json(path: Path) -> None:
    """Validate a model-config JSON before open_clip's registry sees it (a bad file there breaks
    every later lookup, and open_clip skips incomplete configs silently)."""
    if not path.is_file():
        raise ValueError(f"model config {path} not found")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model config {path} is not valid JSON: {exc}") from None
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(
            f"model config {path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)"
        )


def _resolve_model(model: str) -> tuple[str, Path | None]:
    """(name for open_clip.create_model, local directory or None) for a model spec."""
    import open_clip

    if _is_local_dir(model):
        directory = Path(model.removeprefix(LOCAL_DIR))
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(
                f"model directory {directory} has no {CONFIG_NAME} (not a trainer/open_clip dir)"
            )
        return f"{LOCAL_DIR}{directory}", directory
    if model.endswith(".json"):
        path = Path(model)
        _read_model_json(path)
        open_clip.add_model_config(path)
        return path.stem, None
    if model not in open_clip.list_models():
        near = [m for m in open_clip.list_models() if model.lower()[:5] in m.lower()][:8]
        raise ValueError(
            f"unknown open_clip model {model!r}; similar: {', '.join(near) or 'none'} (or pass a .json config)"
        )
    return model, None


def load_clip(
    model: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32"
) -> tuple[Any, Any, Any]:
    """(model in eval mode on ``device``, eval preprocess, tokenizer) for an open_clip model spec.

    ``model``: an open_clip architecture name, a model-config ``.json`` path, or a trainer checkpoint
    directory (``local-dir:<dir>`` or a plain directory path holding ``open_clip_config.json`` and
    ``open_clip_model.safetensors``). ``pretrained``: None (random init, or the directory's weights),
    an open_clip pretrained tag (downloads: only when the user names one), or a local checkpoint path.
    ``precision`` is the weight dtype as in open_clip (fp32/bf16/fp16)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    name, directory = _resolve_model(model)
    checkpoint: Path | None = None
    tag: str | None = None
    if pretrained and looks_like_path(pretrained):
        checkpoint = Path(pretrained)
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint {checkpoint} not found")
    elif pretrained:
        if directory is not None or model.endswith(".json"):
            raise ValueError(f"pretrained tag {pretrained!r} needs a built-in open_clip model, not {model}")
        if not open_clip.get_pretrained_cfg(name, pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; known tags: {tags}")
        tag = pretrained
    elif directory is not None:
        found = [directory / f for f in DIR_CHECKPOINTS if (directory / f).is_file()]
        if not found:
            raise ValueError(f"model directory {directory} holds no weights ({DIR_CHECKPOINTS[0]})")
        checkpoint = found[0]
    try:
        # The directory's own weights are loaded below, through the same strict, one-line-error path;
        # open_clip would log "initialized randomly" for the moment in between, which reads as false.
        with _quiet_random_init_warning(checkpoint is not None):
            net = open_clip.create_model(
                name, pretrained=tag, load_weights=directory is None, precision=precision
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot build open_clip model {model}: {' '.join(str(exc).split())[:200]}"
        ) from None
    if checkpoint is not None:
        _fit_state_dict(net, read_checkpoint(checkpoint), checkpoint, model)
    net = net.to(device).eval()
    cfg = {
        k: v for k, v in open_clip.get_model_preprocess_cfg(net).items() if k in PreprocessCfg.__annotations__
    }
    preprocess = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    return net, preprocess, tokenizer


@contextmanager
def _quiet_random_init_warning(active: bool) -> Iterator[None]:
    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
