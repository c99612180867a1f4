"""CLIP-score filtering, split the way DataComp does it: score once, then decide cheaply.

* ``clip_score`` (``ClipScore``) runs an open_clip model over every pair and writes ``clip_score``, the
  cosine similarity of image and caption embeddings (optionally the L2-normalised embeddings too).
  Rows without an image get reason ``no_image``, undecodable ones ``decode_error`` (NULL score).
* ``clip_filter`` (``ClipFilter``) keeps ``clip_score >= threshold``, or the top ``fraction`` of the whole
  pool with DataComp's rule (``baselines/apply_filter.py``: the threshold is the score at index
  ``int(N * fraction)`` of the descending sort over all shards). It reads only the stored column, so
  changing the threshold never reruns a model.

Models load through ``pairsift.common.clip_models.load_clip`` (open_clip name, model-config JSON or a
trainer checkpoint directory, plus a pretrained tag or a local checkpoint loaded with ``weights_only``).
Decoding lives in ``stages/clip_decode.py`` (batched nvJPEG + GPU resize on CUDA; Pillow fallback).
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pairsift.common.clip_models import LOCAL_DIR, load_clip, looks_like_path, worker_device
from pairsift.stages.base import (
    IMAGE,
    Contract,
    PoolStage,
    Resources,
    ScoreSpec,
    Stage,
    StageConfig,
    with_reason,
)

if TYPE_CHECKING:
    import torch

CAPTION = "caption"
SCORE = "clip_score"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
NO_IMAGE = "no_image"
DECODE_ERROR = "decode_error"
BELOW_THRESHOLD = "clip_score_below_threshold"
NO_SCORE = "no_clip_score"

# ------------------------------------------------------------------------------------------ scoring


@dataclass
class _Batch:
    """One model batch, decoded and tokenised (on the device) by the prefetch thread."""

    rows: np.ndarray  # shard row index of each image in the batch
    ok: np.ndarray  # decodable, in ``rows`` order; pixels/tokens hold only these
    pixels: Any
    tokens: Any
    ready: Any = None  # CUDA event recorded after the batch's copies and decodes


@dataclass
class Scores:
    scores: np.ndarray  # float32, NaN where not scored
    scored: np.ndarray  # bool: decoded and scored
    image_embeddings: np.ndarray | None = None  # float16 [rows, dim], rows without score are zero
    text_embeddings: np.ndarray | None = None


class ClipScorer:
    """Scores (image bytes, caption) pairs in model batches; the next batch is read, decoded and
    tokenised in a background thread (CUDA: on a side stream) while the model runs on this one."""

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        device: str | torch.device,
        precision: str = "fp32",
        decoder: str = "auto",
        threads: int = 2,
        model_threads: int | None = None,
    ):
        import torch

        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device = torch.device(device)
        # Autocast on GPUs only: on most CPUs bf16/fp16 matmuls are slower than fp32, not faster.
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.dtype = dtypes[precision] if self.device.type == "cuda" else None
        from pairsift.stages import clip_decode  # Pillow/torchvision: only where images are decoded

        self.spec = clip_decode.PixelSpec.from_model(model)
        if decoder == "auto":  # the tensor path: nvJPEG on CUDA, and the cheaper of the two on CPU
            decoder = "torchvision"
        # Geometries the tensor path cannot reproduce fall back to open_clip's own PIL preprocess.
        self.decoder = decoder if self.spec.tensor_path_supported else "pil"
        self.threads = max(1, threads)
        self.model_threads = model_threads if self.device.type == "cpu" else None
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Batches decoded ahead of the model: one keeps a CPU busy; on CUDA a second lets one batch's
        # Python work (reading, tokenising) overlap the other's GIL-free nvJPEG decode and copies.
        self.prefetch = 2 if self.side_stream is not None else 1

    def prepare(
        self, images: pa.ChunkedArray | pa.Array, captions: list[str], rows: np.ndarray, pool: Executor
    ) -> _Batch:
        """Read, decode, preprocess and tokenise one batch (runs in the prefetch thread)."""
        import torch

        from pairsift.stages import clip_decode

        blobs = images.take(pa.array(rows)).to_pylist()
        stream = torch.cuda.stream(self.side_stream) if self.side_stream is not None else nullcontext()
        with torch.inference_mode(), stream:
            if self.decoder == "torchvision":
                pixels, ok_list = clip_decode.tensor_pixels(blobs, self.spec, self.device, pool)
            else:
                pixels, ok_list = clip_decode.pil_pixels(blobs, self.preprocess, self.spec, pool)
            ok = np.asarray(ok_list, dtype=bool)
            tokens = self.tokenizer([captions[r] or "" for r in rows[ok]]) if ok.any() else None
            ready = None
            if self.side_stream is not None:
                pixels = pixels.pin_memory().to(self.device, non_blocking=True) if pixels.is_cpu else pixels
                tokens = (
                    tokens.pin_memory().to(self.device, non_blocking=True) if tokens is not None else None
                )
                ready = torch.cuda.Event()
                ready.record(self.side_stream)
        return _Batch(rows=rows, ok=ok, pixels=pixels, tokens=tokens, ready=ready)

    def encode(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 image and text embeddings of the batch's decodable rows (on the device)."""
        import torch
        import torch.nn.functional as F

        if batch.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(batch.ready)
            # Tensors made on the side stream are used on this one: keep the allocator from reusing them.
            batch.pixels.record_stream(current)
            batch.tokens.record_stream(current)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else nullcontext()
        )
        with torch.inference_mode(), autocast:
            image = self.model.encode_image(batch.pixels)
            text = self.model.encode_text(batch.tokens)
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def score(
        self,
        images: pa.ChunkedArray | pa.Array,
        captions: list[str | None],
        rows: np.ndarray,
        batch_size: int,
        embeddings: bool = False,
    ) -> Scores:
        """Score ``rows`` of (images, captions); results are indexed like ``images``."""
        import torch

        n = len(images)
        out = Scores(scores=np.full(n, np.nan, np.float32), scored=np.zeros(n, bool))
        batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        if not batches:
            return out
        parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        previous_threads = torch.get_num_threads()
        if self.model_threads:
            # Spinning intra-op threads starve the decode threads on a small CPU; process-wide, so
            # restored below for whoever runs next in this process.
            torch.set_num_threads(self.model_threads)
        try:
            self._run(images, captions, batches, out, parts if embeddings else None)
        finally:
            torch.set_num_threads(previous_threads)
        if embeddings and parts:
            out.image_embeddings = np.zeros((n, parts[0][1].shape[1]), np.float16)
            out.text_embeddings = np.zeros((n, parts[0][2].shape[1]), np.float16)
            for scored_rows, image, text in parts:
                out.image_embeddings[scored_rows] = image.numpy().astype(np.float16)
                out.text_embeddings[scored_rows] = text.numpy().astype(np.float16)
        return out

    def _run(
        self,
        images: Any,
        captions: list[str | None],
        batches: list[np.ndarray],
        out: Scores,
        parts: list | None,
    ) -> None:
        depth = self.prefetch
        with (
            ThreadPoolExecutor(self.threads, thread_name_prefix="clip-decode") as pool,
            ThreadPoolExecutor(depth, thread_name_prefix="clip-prefetch") as prefetch,
        ):
            pending: deque[Future[_Batch]] = deque(
                prefetch.submit(self.prepare, images, captions, rows, pool) for rows in batches[:depth]
            )
            for index in range(len(batches)):
                batch = pending.popleft().result()
                if index + depth < len(batches):  # keep ``depth`` batches decoding while the model runs
                    pending.append(
                        prefetch.submit(self.prepare, images, captions, batches[index + depth], pool)
                    )
                if not batch.ok.any():
                    continue
                image, text = self.encode(batch)
                scored_rows = batch.rows[batch.ok]
                out.scores[scored_rows] = (image * text).sum(-1).clamp_(-1.0, 1.0).cpu().numpy()
                out.scored[scored_rows] = True
                if parts is not None:
                    parts.append((scored_rows, image.cpu(), text.cpu()))


# ---------------------------------------------------------------------------------------- the stage


class ClipScoreConfig(StageConfig):
    model: str = Field(
        ...,
        min_length=1,
        description="open_clip name (ViT-B-32), model-config .json, or trainer checkpoint dir",
    )
    pretrained: str | None = Field(None, description="open_clip pretrained tag or local checkpoint path")
    batch_size: int = Field(256, gt=0, description="images per model batch (the executor moves whole shards)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if the worker has a GPU")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype on CUDA (weights stay fp32); CPU always computes in fp32"
    )
    gpus: float | None = Field(
        None, ge=0, description="GPU share per actor (0.25 packs 4); None: 1 if cuda else 0"
    )
    cpus: float = Field(1.0, gt=0, description="CPUs per actor")
    decode_threads: int | None = Field(
        None, gt=0, description="image decode threads; None: cpus (rounded up)"
    )
    model_threads: int | None = Field(
        None, gt=0, description="CPU device: torch threads; None: max(1, cpus - 1)"
    )
    decoder: Literal["auto", "pil", "torchvision"] = Field(
        "auto",
        description="auto = torchvision (batched nvJPEG on CUDA, libjpeg per thread on CPU; Pillow for "
        "other formats); pil = Pillow + the model's open_clip preprocess",
    )
    store_embeddings: bool = Field(False, description="also write L2-normalised float16 embeddings")

    @model_validator(mode="after")
    def _check(self) -> ClipScoreConfig:
        if self.device == "cuda" and self.gpus == 0:
            raise ValueError("device 'cuda' needs gpus > 0 (or leave gpus unset)")
        if self.model.endswith(".json") and not os.path.isfile(self.model):
            raise ValueError(f"model config {self.model} not found")
        if self.model.startswith(LOCAL_DIR) and not os.path.isdir(self.model.removeprefix(LOCAL_DIR)):
            raise ValueError(f"model directory {self.model.removeprefix(LOCAL_DIR)} not found")
        if self.pretrained and looks_like_path(self.pretrained) and not os.path.isfile(self.pretrained):
            raise ValueError(f"checkpoint {self.pretrained} not found")
        return self


class ClipScore(Stage):
    """Cosine similarity of each image with its caption under an open_clip model."""

    name: ClassVar[str] = "clip_score"
    config_class: ClassVar[type[StageConfig]] = ClipScoreConfig
    stateful: ClassVar[bool] = True
    cfg: ClipScoreConfig

    def __init__(self, cfg: ClipScoreConfig):
        super().__init__(cfg)
        self.scorer: ClipScorer | None = None

    def contract(self) -> Contract:
        writes = {SCORE: pa.float32()}
        if self.cfg.store_embeddings:
            writes |= {IMAGE_EMBEDDING: pa.list_(pa.float16()), TEXT_EMBEDDING: pa.list_(pa.float16())}
        return Contract(reads=(IMAGE, CAPTION), writes=writes, reasons=(DECODE_ERROR, NO_IMAGE),
                        bulky=(IMAGE_EMBEDDING, TEXT_EMBEDDING),
                        scores={SCORE: ScoreSpec("clip_score (cosine similarity of image and caption)")})

    @property
    def resources(self) -> Resources:
        gpus = self.cfg.gpus if self.cfg.gpus is not None else (1.0 if self.cfg.device == "cuda" else 0.0)
        return Resources(cpus=self.cfg.cpus, gpus=gpus)

    def setup(self) -> None:
        device = worker_device(self.cfg.device, "clip_score")
        model, preprocess, tokenizer = load_clip(self.cfg.model, self.cfg.pretrained, device=device)
        threads = self.cfg.decode_threads or max(1, math.ceil(self.cfg.cpus))
        # On CPU the decode threads need cores too: leave them one, keep at least one for the model.
        model_threads = self.cfg.model_threads or max(1, math.floor(self.cfg.cpus) - 1)
        self.scorer = ClipScorer(
            model, preprocess, tokenizer, device, self.cfg.precision, self.cfg.decoder, threads, model_threads
        )

    def __call__(self, shard: pa.Table) -> pa.Table:
        if self.scorer is None:
            self.setup()
        assert self.scorer is not None
        for column in (IMAGE, CAPTION):
            if column not in shard.column_names:
                raise ValueError(
                    f"clip_score: shard has no {column!r} column (columns: {', '.join(shard.column_names)})"
                )
        images = shard.column(IMAGE)
        has_image = images.is_valid().to_numpy(zero_copy_only=False) if shard.num_rows else np.zeros(0, bool)
        captions = shard.column(CAPTION).to_pylist()
        result = self.scorer.score(
            images, captions, np.flatnonzero(has_image), self.cfg.batch_size, self.cfg.store_embeddings
        )
        reasons = [
            None if ok else (DECODE_ERROR if present else NO_IMAGE)
            for ok, present in zip(result.scored, has_image)
        ]
        shard = shard.append_column(SCORE, pa.array(result.scores, pa.float32(), mask=~result.scored))
        if self.cfg.store_embeddings:
            shard = shard.append_column(
                IMAGE_EMBEDDING, _embedding_column(result.image_embeddings, result.scored)
            )
            shard = shard.append_column(
                TEXT_EMBEDDING, _embedding_column(result.text_embeddings, result.scored)
            )
        return with_reason(shard, reasons)


def _embedding_column(matrix: np.ndarray | None, valid: np.ndarray) -> pa.Array:
    """list<float16>, NULL where the row was not scored."""
    if matrix is None:
        return pa.nulls(len(valid), pa.list_(pa.float16()))
    dim = matrix.shape[1]
    offsets = pa.array(np.arange(len(valid) + 1, dtype=np.int32) * dim, pa.int32())
    values = pa.array(matrix.reshape(-1), pa.float16())
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~valid))


# ---------------------------------------------------------------------------------------- the filter


class ClipFilterConfig(StageConfig):
    threshold: float | None = Field(None, description="keep clip_score >= threshold")
    fraction: float | None = Field(None, gt=0, le=1, description="keep the top fraction of the whole pool")

    @model_validator(mode="after")
    def _exactly_one(self) -> ClipFilterConfig:
        if (self.threshold is None) == (self.fraction is None):
            raise ValueError("give exactly one of threshold or fraction")
        return self


def pool_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """DataComp's top-fraction threshold: the score at index int(N * fraction) of the descending sort
    (so ``>=`` keeps at least that many rows, ties included). None for an empty pool; with fraction 1
    the index is past the end and every row is kept."""
    n = len(scores)
    if n == 0:
        return None
    index = int(n * fraction)
    if index >= n:
        return float(scores.min())
    return float(-np.partition(-scores, index)[index])  # linear-time k-th largest, same value as the sort


class ClipFilter(PoolStage):
    """Keep pairs by stored ``clip_score``: an absolute threshold, or DataComp's pool-wide fraction."""

    name: ClassVar[str] = "clip_filter"
    config_class: ClassVar[type[StageConfig]] = ClipFilterConfig
    cfg: ClipFilterConfig

    def contract(self) -> Contract:
        rule = "fixed" if self.cfg.fraction is None else f"top {self.cfg.fraction:.0%} of the pool"
        return Contract(reads=(SCORE,), reasons=(BELOW_THRESHOLD, NO_SCORE),
                        scores={SCORE: ScoreSpec("clip_score (cosine similarity of image and caption)",
                                                 threshold="threshold", rule=rule)})

    @staticmethod
    def _scores(shard: pa.Table) -> pa.ChunkedArray:
        if SCORE not in shard.column_names:
            raise ValueError("clip_filter: shard has no 'clip_score' column; run clip_score before it")
        return shard.column(SCORE)

    def partial(self, shard: pa.Table) -> pa.Table:
        scores = self._scores(shard).drop_null().cast(pa.float32())
        return pa.table({SCORE: scores})

    def fit(self, partials: list[pa.Table]) -> dict[str, Any]:
        arrays = [p.column(SCORE).to_numpy() for p in partials if p.num_rows]
        scores = np.concatenate(arrays).astype(np.float32) if arrays else np.zeros(0, np.float32)
        if self.cfg.threshold is not None:
            threshold: float | None = float(self.cfg.threshold)
        else:
            assert self.cfg.fraction is not None
            threshold = pool_threshold(scores, self.cfg.fraction)
        return {"threshold": threshold, "pool_size": len(scores)}

    def apply(self, shard: pa.Table, fitted: dict[str, Any], partial: pa.Table) -> pa.Table:
        # float32 on both sides, as DataComp compares its float32 column (nulls -> NaN)
        scores = self._scores(shard).to_numpy(zero_copy_only=False).astype(np.float32)
        threshold = None if fitted["threshold"] is None else np.float32(fitted["threshold"])
        reasons: list[str | None] = []
        for score in scores:
            if np.isnan(score):
                reasons.append(NO_SCORE)
            elif threshold is None or score < threshold:
                reasons.append(BELOW_THRESHOLD)
            else:
                reasons.append(None)
        return with_reason(shard, reasons)
