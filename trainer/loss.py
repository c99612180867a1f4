"""Contrastive losses (open_clip's own) and one exact optimizer step over accumulated micro-batches.

Losses take ``rank``/``world_size`` explicitly, so they test in one process. With DDP the ranks'
features are gathered with gradients (``gather_with_grad``), so the averaged gradient equals the
single-process gradient of the same global batch.

Accumulation caches every micro-batch's features first (no grad), then re-runs each micro-batch with
grad against the full cached set: the step's gradient is that of one big contrastive batch, not of
A small ones (open_clip_train's accum_freq idea). The temperature/bias get their gradient once, from
the last micro-batch, instead of A times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from open_clip.loss import ClipLoss, SigLipLoss


def make_loss(kind: str, rank: int = 0, world_size: int = 1, local_loss: bool = True,
              gather_with_grad: bool = True) -> torch.nn.Module:
    if kind == "clip":
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                        rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"unknown loss '{kind}' (clip or siglip)")


def features_loss(loss_fn: torch.nn.Module, image_features: torch.Tensor, text_features: torch.Tensor,
                  logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
    return loss_fn(image_features, text_features, logit_scale, logit_bias)


def _outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)


def accumulated_backward(
    model: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: torch.nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager],
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> float:
    """Run forward/backward for one optimizer step; returns this rank's loss value."""
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with autocast():
            loss = features_loss(loss_fn, *_outputs(model(images, texts)))
        backward(loss)
        return float(loss.detach())

    cached_img, cached_txt = [], []
    with torch.no_grad(), autocast():
        for images, texts in micro_batches:
            img, txt, _, _ = _outputs(model(images, texts))
            cached_img.append(img)
            cached_txt.append(txt)
    last = len(micro_batches) - 1
    loss_value = 0.0
    for j, (images, texts) in enumerate(micro_batches):
        ctx = no_sync() if (no_sync is not None and j < last) else contextlib.nullcontext()
        with ctx:
            with autocast():
                img, txt, scale, bias = _outputs(model(images, texts))
                if j < last:  # temperature and bias: gradient once, from the last micro-batch
                    scale = scale.detach()
                    bias = bias.detach() if bias is not None else None
                all_img = torch.cat(cached_img[:j] + [img] + cached_img[j + 1:])
                all_txt = torch.cat(cached_txt[:j] + [txt] + cached_txt[j + 1:])
                loss = features_loss(loss_fn, all_img, all_txt, scale, bias)
            backward(loss)
        loss_value = float(loss.detach())
    return loss_value
