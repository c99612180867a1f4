"""Evaluation as plain functions: zero-shot classification and image↔text retrieval.

Held-out data is a webdataset directory (sample json may carry ``label``: index into classnames or a
class name) with ``classnames.json`` (list of names) and ``templates.json`` (list of prompts with
``{}``) beside the tars, or an image folder (``<dir>/<class>/*.jpg``, optional same-stem .txt
captions). A corpus directory with a ``test/`` folder (the synthetic corpus) works as is.

Retrieval with repeated captions: texts are de-duplicated; an image's hit is its caption's text, a
text's hits are all images carrying it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pairsift.common.images import open_image
from pairsift.common.tars import iter_tar_samples
from pairsift.trainer.config import ConfigError
from pairsift.trainer.data import IMAGE_EXTS, captions_of, expand_shards

DEFAULT_TEMPLATES = ["a photo of a {}."]


@dataclass
class EvalSet:
    images: list[bytes] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    classnames: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    skipped: int = 0


def _read_names(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if isinstance(raw, dict):  # {"0": "red circle", ...}
        return [raw[k] for k in sorted(raw, key=lambda k: int(k))]
    return [str(x) for x in raw]


def _read_templates(path: Path) -> list[str]:
    names = _read_names(path)
    return [t.replace("{c}", "{}") for t in names] if names else list(DEFAULT_TEMPLATES)


def _label_index(label: Any, classnames: list[str] | None) -> int | None:
    if isinstance(label, bool) or label is None:
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and classnames and label in classnames:
        return classnames.index(label)
    return None


def _find_root(data: Path) -> Path:
    if data.is_dir() and not any(data.glob("*.tar")) and (data / "test").is_dir():
        return data / "test"
    return data


def load_eval_set(data: str | Path, max_samples: int | None = None) -> EvalSet:
    root = _find_root(Path(data))
    if root.is_dir() and not any(root.glob("*.tar")):
        return _load_image_folder(root, max_samples)
    shards = expand_shards(str(root))
    meta_dir = shards[0].parent
    es = EvalSet(classnames=_read_names(meta_dir / "classnames.json"),
                 templates=_read_templates(meta_dir / "templates.json"))
    for shard in shards:
        for _key, raw in iter_tar_samples(shard):
            if max_samples is not None and len(es.images) >= max_samples:
                return es
            img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if img_ext is None:
                es.skipped += 1
                continue
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
            except ValueError:
                meta = {}
            txt = raw["txt"].decode("utf-8", "replace") if "txt" in raw else None
            alt = captions_of(meta if isinstance(meta, dict) else {}, txt)["alt"]
            es.images.append(raw[img_ext])
            es.captions.append(alt[0] if alt else None)
            es.labels.append(_label_index(meta.get("label") if isinstance(meta, dict) else None, es.classnames))
    return es


def _load_image_folder(root: Path, max_samples: int | None) -> EvalSet:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    es = EvalSet(classnames=_read_names(root / "classnames.json") or classes,
                 templates=_read_templates(root / "templates.json"))
    for ci, cls in enumerate(classes):
        for img in sorted(p for p in (root / cls).iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
            if max_samples is not None and len(es.images) >= max_samples:
                return es
            txt = img.with_suffix(".txt")
            es.images.append(img.read_bytes())
            es.captions.append(txt.read_text().strip() if txt.is_file() else None)
            es.labels.append(ci)
    if not es.images:
        raise ConfigError(f"no images found in {root} (expected *.tar shards or <class>/<image> folders)")
    return es


def _decode(data: bytes) -> Image.Image | None:
    try:
        with open_image(data) as im:
            im.load()
            return im.convert("RGB")
    except Exception:  # a broken image in a test set is skipped, not fatal
        return None


@torch.no_grad()
def _encode_images(model, preprocess, es: EvalSet, batch_size: int, device) -> tuple[torch.Tensor, list[int]]:
    feats, kept = [], []
    for start in range(0, len(es.images), batch_size):
        batch, idx = [], []
        for i in range(start, min(start + batch_size, len(es.images))):
            img = _decode(es.images[i])
            if img is not None:
                batch.append(preprocess(img))
                idx.append(i)
        if batch:
            feats.append(model.encode_image(torch.stack(batch).to(device), normalize=True).float())
            kept.extend(idx)
    return (torch.cat(feats) if feats else torch.empty(0)), kept


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: list[str], batch_size: int, device) -> torch.Tensor:
    out = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


def zero_shot(image_features: torch.Tensor, labels: list[int], class_features: torch.Tensor,
              classnames: list[str]) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy from L2-normalised features (class_features: C×D)."""
    logits = image_features @ class_features.T
    target = torch.tensor(labels)
    k = min(5, len(classnames))
    topk = logits.topk(k, dim=1).indices
    hit1 = topk[:, 0] == target
    hit5 = (topk == target[:, None]).any(dim=1)
    per_class, per_class_n = {}, {}
    for c, name in enumerate(classnames):
        mask = target == c
        if mask.any():
            per_class[name] = float(hit1[mask].float().mean())
            per_class_n[name] = int(mask.sum())
    return {"top1": float(hit1.float().mean()), "top5": float(hit5.float().mean()),
            "per_class": per_class, "per_class_count": per_class_n, "classes": len(classnames)}


def retrieval(image_features: torch.Tensor, captions: list[str], text_features: torch.Tensor,
              unique_texts: list[str], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways; ``text_features`` are for ``unique_texts``."""
    pos = {t: i for i, t in enumerate(unique_texts)}
    truth = torch.tensor([pos[c] for c in captions])
    sims = image_features @ text_features.T  # images × unique texts
    out: dict[str, float] = {}
    i2t_rank = (sims > sims.gather(1, truth[:, None])).sum(dim=1)  # texts scoring above the right one
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
    order = sims.T.argsort(dim=1, descending=True)  # per text: images best first
    correct = truth[order] == torch.arange(len(unique_texts))[:, None]
    first_hit = correct.float().argmax(dim=1)
    for k in ks:
        out[f"t2i_r{k}"] = float((first_hit < k).float().mean())
    return out


def evaluate(model, preprocess, tokenizer, data: str | Path | EvalSet, batch_size: int = 256,
             device: str | torch.device = "cpu", max_samples: int | None = None) -> dict[str, Any]:
    """Zero-shot (where labels and class names exist) and retrieval (where captions exist)."""
    es = data if isinstance(data, EvalSet) else load_eval_set(data, max_samples)
    was_training = model.training
    model.eval()
    try:
        img_feats, kept = _encode_images(model, preprocess, es, batch_size, device)
        result: dict[str, Any] = {"samples": len(kept), "skipped": es.skipped + len(es.images) - len(kept)}
        labelled = [(r, es.labels[i]) for r, i in enumerate(kept) if es.labels[i] is not None]
        if es.classnames and labelled:
            prompts = [t.format(c) for c in es.classnames for t in es.templates]
            tf = _encode_texts(model, tokenizer, prompts, batch_size, device)
            tf = tf.reshape(len(es.classnames), len(es.templates), -1).mean(dim=1)
            tf = tf / tf.norm(dim=1, keepdim=True)
            rows = torch.tensor([r for r, _ in labelled])
            result.update(zero_shot(img_feats[rows], [lab for _, lab in labelled], tf, es.classnames))
        captioned = [(r, es.captions[i]) for r, i in enumerate(kept) if es.captions[i]]
        if captioned:
            unique = sorted({c for _, c in captioned})
            tf = _encode_texts(model, tokenizer, unique, batch_size, device)
            rows = torch.tensor([r for r, _ in captioned])
            result.update(retrieval(img_feats[rows], [c for _, c in captioned], tf, unique))
        return result
    finally:
        model.train(was_training)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, out: str | Path | None = None,
                        batch_size: int = 256, device: str = "cpu") -> dict[str, Any]:
    """Load a ``pairsift train`` export (local-dir) and evaluate it; writes JSON to ``out`` if given."""
    from pairsift.trainer.model import load_local_dir

    model, preprocess, tokenizer = load_local_dir(checkpoint, device=device)
    result = evaluate(model, preprocess, tokenizer, data, batch_size=batch_size, device=device)
    result["checkpoint"] = str(checkpoint)
    result["data"] = str(data)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [("samples", str(result.get("samples", 0)))]
    for key in ("top1", "top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        if key in result:
            rows.append((key, f"{100 * result[key]:.2f}%"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)
