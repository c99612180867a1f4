"""Concept tags (``concept_tags``): the top-k metadata entries by CLIP similarity, added to the caption.

The weight-free variant of VeCLIP enrichment (CPU, the demo): no language model, only a CLIP model
and an entry list (the balance stage's metadata). Entries are embedded once per worker as text
(``entry_prompt``); each image's embedding is clip_score's stored ``image_embedding`` column when
an earlier stage wrote it with the same model, and otherwise comes from ``ClipScorer``, clip_score's
own decoding and embedding path, so both give the same tags. Writes ``concept_tags`` and an
``enriched_caption`` made by ``template`` (the trainer reads it as a caption); a row without an
embedding or a decodable image gets the flag ``no_image``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pairsift.common.clip_models import load_clip, worker_device
from pairsift.stages.base import IMAGE, Contract, Resources, Stage, StageConfig
from pairsift.stages.clip_score import IMAGE_EMBEDDING, ClipScorer
from pairsift.stages.generation import alive

TAGS = "concept_tags"
ENRICHED = "enriched_caption"
FLAGS = "enrich_flags"  # the column name enrich (VeCLIP) uses too: one place to look for why


class ConceptTagsConfig(StageConfig):
    # as pairsift.common.clip_models.load_clip; clip_score's model, to reuse its image_embedding column
    clip_model: str = Field(..., min_length=1)
    clip_pretrained: str | None = None
    entries: str = Field(..., min_length=1)  # entry list file (one per line or a JSON list), as balance reads
    entry_prompt: str = "a photo of a {entry}."  # how an entry is embedded as text
    top_k: int = Field(3, ge=1)
    template: str = "{caption}. tags: {tags}"
    tag_separator: str = ", "
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # auto: CUDA if the worker has a GPU
    batch_size: int = Field(256, ge=1)
    cpus: float = 1.0
    gpus: float = 0.0

    @model_validator(mode="after")
    def _check_templates(self) -> ConceptTagsConfig:
        if "{tags}" not in self.template or "{entry}" not in self.entry_prompt:
            raise ValueError("concept_tags: template needs {tags} and entry_prompt needs {entry}")
        return self


class ConceptTags(Stage):
    """The ``top_k`` entries nearest each image under CLIP -> ``concept_tags`` + ``enriched_caption``."""

    name: ClassVar[str] = "concept_tags"
    config_class: ClassVar[type[StageConfig]] = ConceptTagsConfig
    stateful: ClassVar[bool] = True  # the model and the entry embeddings load once per worker
    cfg: ConceptTagsConfig

    def __init__(self, cfg: ConceptTagsConfig):
        super().__init__(cfg)
        self.scorer: ClipScorer | None = None

    def contract(self) -> Contract:
        return Contract(reads=("caption",), optional=(IMAGE, IMAGE_EMBEDDING), captions=(ENRICHED,),
                        writes={TAGS: pa.list_(pa.string()), ENRICHED: pa.string(), FLAGS: pa.list_(pa.string())})

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cfg.cpus, gpus=self.cfg.gpus)

    def setup(self) -> None:
        from pairsift.stages.metadata import load_metadata

        self.entries = list(load_metadata(self.cfg.entries).entries)
        if not self.entries:
            raise ValueError(f"concept_tags: entry list {self.cfg.entries} is empty")
        device = worker_device(self.cfg.device, "concept_tags")
        model, preprocess, tokenizer = load_clip(self.cfg.clip_model, self.cfg.clip_pretrained, device=device)
        model.eval()
        threads = max(1, math.ceil(self.cfg.cpus))
        self.scorer = ClipScorer(model, preprocess, tokenizer, device, threads=threads,
                                 model_threads=max(1, math.floor(self.cfg.cpus) - 1))
        self.entry_embeddings = self._embed_entries()

    def _embed_entries(self) -> Any:
        """L2-normalised text embeddings of every entry, in ``entries`` order (on the model's device)."""
        import torch

        assert self.scorer is not None
        texts = [self.cfg.entry_prompt.format(entry=e) for e in self.entries]
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.cfg.batch_size):
                tokens = self.scorer.tokenizer(texts[start:start + self.cfg.batch_size]).to(self.scorer.device)
                chunks.append(torch.nn.functional.normalize(self.scorer.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(chunks)

    def image_embeddings(self, shard: pa.Table, rows: list[int]) -> dict[int, Any]:
        """Row -> L2-normalised image embedding: clip_score's column where present, else ClipScorer's."""
        import torch

        assert self.scorer is not None
        found: dict[int, Any] = {}
        stored = shard.column(IMAGE_EMBEDDING).to_pylist() if IMAGE_EMBEDDING in shard.column_names else None
        images = shard.column(IMAGE) if IMAGE in shard.column_names else pa.nulls(shard.num_rows, pa.binary())
        has_image = images.is_valid().to_numpy(zero_copy_only=False) if shard.num_rows else np.zeros(0, bool)
        missing = []
        for i in rows:
            if stored is not None and stored[i] is not None:
                found[i] = torch.tensor(stored[i], dtype=torch.float32)
            elif has_image[i]:
                missing.append(i)
        if missing:
            captions = shard.column("caption").to_pylist()
            # the caption scores are a by-product here; the image embeddings are clip_score's, bit for bit
            scored = self.scorer.score(images, captions, np.asarray(missing), self.cfg.batch_size, embeddings=True)
            for i in np.flatnonzero(scored.scored):  # an undecodable image gets no tags
                found[int(i)] = torch.from_numpy(scored.image_embeddings[i].astype(np.float32))
        return found

    def __call__(self, shard: pa.Table) -> pa.Table:
        import torch

        if self.scorer is None:
            self.setup()
        captions = shard.column("caption").to_pylist()
        rows = [i for i, kept in enumerate(alive(shard)) if kept]
        embeddings = self.image_embeddings(shard, rows)
        untagged = set(rows) - set(embeddings)
        tags: list[list[str] | None] = [None] * shard.num_rows
        enriched: list[str | None] = [None] * shard.num_rows
        flags = [["no_image"] if i in untagged else [] for i in range(shard.num_rows)]
        ids = sorted(embeddings)
        if ids:
            for i, picked in zip(ids, self._top_entries(torch.stack([embeddings[i] for i in ids]))):
                tags[i] = [self.entries[j] for j in picked]
                joined = self.cfg.tag_separator.join(tags[i])
                caption = (captions[i] or "").strip()
                enriched[i] = self.cfg.template.format(caption=caption, tags=joined) if caption else joined
        shard = shard.append_column(TAGS, pa.array(tags, pa.list_(pa.string())))
        shard = shard.append_column(ENRICHED, pa.array(enriched, pa.string()))
        return shard.append_column(FLAGS, pa.array(flags, pa.list_(pa.string())))

    def _top_entries(self, image_emb: Any) -> list[list[int]]:
        """Indices of the ``top_k`` entries by cosine similarity, for each image embedding."""
        entries = self.entry_embeddings
        if image_emb.shape[1] != entries.shape[1]:
            raise ValueError(
                f"concept_tags: image_embedding has {image_emb.shape[1]} dims, clip_model {self.cfg.clip_model} "
                f"gives {entries.shape[1]}: use the clip_score stage's model"
            )
        k = min(self.cfg.top_k, len(self.entries))
        return (image_emb.to(entries.device) @ entries.T).topk(k, dim=1).indices.tolist()
