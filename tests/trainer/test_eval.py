"""Evaluation math on features with a known answer, and the image-folder layout."""

from __future__ import annotations

import json

import pytest
import torch
from synth_shards import CONCEPTS, TINY, draw

from pairsift.trainer.eval import evaluate, format_table, load_eval_set, retrieval, zero_shot


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_zero_shot_counts_top1_top5_and_per_class():
    classes = torch.eye(6)  # class c's text feature is axis c
    # 4 images: two right (classes 0, 1), one whose 2nd guess is right, one wrong in the top 5 too
    images = _unit(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0],
                                 [0, 0, 0.5, 1.0, 0, 0], [0, 0, 0, 0, 0, 0.0]]) + 1e-3 * torch.arange(6))
    labels = [0, 1, 2, 0]
    r = zero_shot(images, labels, classes, [f"c{i}" for i in range(6)])
    assert r["top1"] == pytest.approx(0.5)
    assert r["top5"] == pytest.approx(0.75)  # image 3 ranks class 0 last of 6 (smallest bias)
    assert r["per_class"] == {"c0": 0.5, "c1": 1.0, "c2": 0.0}
    assert r["per_class_count"] == {"c0": 2, "c1": 1, "c2": 1}


def test_retrieval_recall_with_repeated_captions():
    texts = ["a", "b", "c"]
    tf = torch.eye(3)
    # images 0,1 carry "a" (image 1 looks like "b"), image 2 carries "b", image 3 carries "c"
    imgs = _unit(torch.tensor([[1.0, 0.1, 0], [0.2, 1.0, 0], [0, 1.0, 0.5], [0.3, 0, 1.0]]))
    r = retrieval(imgs, ["a", "a", "b", "c"], tf, texts, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(3 / 4) and r["i2t_r2"] == pytest.approx(1.0)
    # t2i: "a" → best image is 0 (hit); "b" → best is 1 (carries "a"), 2nd is 2; "c" → image 3
    assert r["t2i_r1"] == pytest.approx(2 / 3) and r["t2i_r2"] == pytest.approx(1.0)


def test_image_folder_layout_evaluates(tmp_path):
    import random

    from pairsift.trainer.model import build_model

    rng = random.Random(0)
    for name in CONCEPTS[:4]:
        d = tmp_path / "folder" / name.replace(" ", "_")
        d.mkdir(parents=True)
        for i in range(3):
            draw(name, rng).save(d / f"{i}.png")
            (d / f"{i}.txt").write_text(f"a {name} number {i}")
    (tmp_path / "folder" / "classnames.json").write_text(json.dumps(CONCEPTS[:4]))
    es = load_eval_set(tmp_path / "folder")
    assert len(es.images) == 12 and es.labels == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    b = build_model(TINY)
    r = evaluate(b.model, b.val_transform, b.tokenizer, es)
    assert r["samples"] == 12 and r["classes"] == 4 and set(r["per_class"]) == set(CONCEPTS[:4])
    assert 0 <= r["top1"] <= 1 and r["top5"] == 1.0  # 4 classes: top-5 covers all
    assert "i2t_r10" in r and "top1" in format_table(r)
