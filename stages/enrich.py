"""VeCLIP enrichment (``enrich``): a VLM describes each image, an LLM fuses alt-text and description.

The fused caption must keep the alt-text's names and numbers (``keep_facts``); every output is
checked (``stages.caption_checks``), retried once with a fresh draw, then left null (the trainer
falls back to the alt-text). The weight-free variant, CLIP concept tags, is ``stages.concept_tags``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pairsift.stages.base import IMAGE, Contract, Resources, Stage, StageConfig
from pairsift.stages.caption_checks import (
    Bounds,
    EchoGuard,
    check_text,
    key_facts,
    normalize,
    parse_completion,
    sanitize,
)
from pairsift.stages.engines import Completion, Engine, EngineConfig, Prompt, SamplingParams, make_engine
from pairsift.stages.generation import Meter, alive, engine_gpus, read_prompt, row_keys, row_seed

# Keys only the concept_tags stage has: an ``enrich`` config naming them means concept tags.
TAGS_KEYS = frozenset({"clip_model", "clip_pretrained", "entries", "entry_prompt", "top_k", "template",
                       "tag_separator"})


class EnrichConfig(StageConfig):
    mode: Literal["vlm"] = "vlm"  # the one mode; concept tags are their own stage (concept_tags)
    seed: int = 0
    batch_size: int = Field(256, ge=1)
    cpus: float = 1.0
    gpus: float = 0.0
    # describe with the VLM, fuse with the LLM (the VLM itself when llm is unset)
    vlm: EngineConfig | None = None
    llm: EngineConfig | None = None
    describe_prompt: str = Field(default_factory=lambda: read_prompt("veclip_describe.txt"))
    describe_max_tokens: int = Field(96, ge=1)
    fuse_prompt: str = Field(
        default_factory=lambda: read_prompt("veclip_fuse.txt")
    )  # {caption} {description}
    fuse_max_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.2, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_caption_chars: int = Field(300, ge=10)
    max_words: int = Field(80, ge=1)
    max_chars: int = Field(600, ge=1)
    keep_facts: bool = True  # a fused caption must keep the alt-text's numbers and names
    retries: int = Field(1, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _concept_tags_moved(cls, data: Any) -> Any:
        # ``enrich`` used to tag images with CLIP (mode concept_tags, the default): say where that
        # went rather than list its keys as unknown.
        if isinstance(data, dict) and (data.get("mode") == "concept_tags" or TAGS_KEYS & set(data)):
            raise ValueError("enrich: concept tags are now their own stage: write `stage: concept_tags` "
                             "with the same keys and no mode")
        return data

    @model_validator(mode="after")
    def _check_engines(self) -> EnrichConfig:
        if self.vlm is None:
            raise ValueError("enrich: mode 'vlm' needs a vlm engine (vlm: {backend: ..., model: ...})")
        if "{caption}" not in self.fuse_prompt or "{description}" not in self.fuse_prompt:
            raise ValueError("enrich: fuse_prompt must contain {caption} and {description}")
        return self


class Enrich(Stage):
    """VeCLIP: ``visual_description`` + ``enriched_caption``, from a VLM and an LLM."""

    name = "enrich"
    config_class = EnrichConfig
    stateful = True
    cfg: EnrichConfig

    def __init__(self, cfg: EnrichConfig):
        super().__init__(cfg)
        self.ready = False
        self.meter = Meter("enrich")
        self.bounds = Bounds(min_words=3, max_words=cfg.max_words, max_chars=cfg.max_chars)
        fixed = [cfg.describe_prompt, *re.split(r"\{caption\}|\{description\}", cfg.fuse_prompt)]
        self.guard = EchoGuard.of(fixed, [])

    def contract(self) -> Contract:
        return Contract(reads=("uid", "caption", IMAGE), captions=("enriched_caption",), writes={
            "visual_description": pa.string(), "enriched_caption": pa.string(),
            "enrich_flags": pa.list_(pa.string())})

    @property
    def resources(self) -> Resources:
        gpus = self.cfg.gpus
        for engine in (self.cfg.vlm, self.cfg.llm):
            gpus = engine_gpus(gpus, engine)
        return Resources(cpus=self.cfg.cpus, gpus=gpus)

    def setup(self) -> None:
        self.vlm = make_engine(self.cfg.vlm)  # type: ignore[arg-type]
        self.llm = make_engine(self.cfg.llm) if self.cfg.llm is not None else self.vlm
        self.ready = True

    def __call__(self, shard: pa.Table) -> pa.Table:
        if not self.ready:
            self.setup()
        return self._enrich_vlm(shard)

    def _generate_valid(
        self,
        engine: Engine,
        prompts: dict[int, Any],
        params: SamplingParams,
        check: Any,
        flags: list[list[str]],
    ) -> dict[int, str]:
        """Generate for each row's prompt maker, keep what ``check`` accepts, retry the rest."""
        accepted: dict[int, str] = {}
        todo = list(prompts)
        for attempt in range(self.cfg.retries + 1):
            if not todo:
                break
            batch = [prompts[i](attempt) for i in todo]
            done = self.meter.run(engine, batch, params, self.cfg.batch_size)
            failed = []
            for i, completion in zip(todo, done):
                text, reason = check(i, completion)
                if text is None:
                    flags[i].append(reason)
                    self.meter.flags[reason] += 1
                    failed.append(i)
                else:
                    accepted[i] = text
            todo = failed
        return accepted

    def _enrich_vlm(self, shard: pa.Table) -> pa.Table:
        captions = shard.column("caption").to_pylist()
        images = shard.column(IMAGE).to_pylist() if IMAGE in shard.column_names else [None] * shard.num_rows
        uids, kept_rows = row_keys(shard), alive(shard)
        flags: list[list[str]] = [[] for _ in captions]
        cfg = self.cfg
        describe_params = SamplingParams(cfg.describe_max_tokens, cfg.temperature, cfg.top_p, stop=("\n",))
        fuse_params = SamplingParams(cfg.fuse_max_tokens, cfg.temperature, cfg.top_p, stop=('"', "\n"))
        before = self.meter.mark()

        def describe_prompt(i: int) -> Any:
            return lambda attempt: Prompt(
                cfg.describe_prompt, images[i], row_seed(cfg.seed, uids[i], "describe", attempt)
            )

        def fuse_prompt(i: int) -> Any:
            text = cfg.fuse_prompt.format(
                caption=sanitize(captions[i], cfg.max_caption_chars),
                description=sanitize(described[i], cfg.max_chars),
            )
            return lambda attempt: Prompt(text, None, row_seed(cfg.seed, uids[i], "fuse", attempt))

        for i in range(len(captions)):
            if kept_rows[i] and images[i] is None:
                flags[i].append("no_image")
        described = self._generate_valid(
            self.vlm,
            {i: describe_prompt(i) for i in range(len(captions)) if kept_rows[i] and images[i] is not None},
            describe_params,
            lambda i, c: self._check(c, None),
            flags,
        )
        with_caption = {i: fuse_prompt(i) for i in described if captions[i]}
        fused = self._generate_valid(
            self.llm, with_caption, fuse_params, lambda i, c: self._check(c, captions[i]), flags
        )
        for i in described:
            if not captions[i]:
                fused[i] = described[i]  # no alt-text to keep: the description is the caption
        self.meter.log_shard(shard.num_rows, len(fused), "enriched", before)
        shard = shard.append_column(
            "visual_description", pa.array([described.get(i) for i in range(len(captions))], pa.string())
        )
        shard = shard.append_column(
            "enriched_caption", pa.array([fused.get(i) for i in range(len(captions))], pa.string())
        )
        return shard.append_column("enrich_flags", pa.array(flags, pa.list_(pa.string())))

    def _check(self, completion: Completion, caption: str | None) -> tuple[str | None, str | None]:
        """Describe (caption None) or fuse output: (text, None) to keep, (None, reason) to reject."""
        if completion.finish_reason == "error":
            return None, "engine_error"
        if completion.finish_reason == "length":
            return None, "truncated"
        text = parse_completion(completion.text)
        reason = check_text(text, self.bounds)
        if reason is None and self.guard.echoes(text, caption or ""):
            reason = "echo"
        if reason is None and caption is not None:
            if normalize(text) == normalize(caption):
                reason = "copy"
            elif self.cfg.keep_facts and not set(
                key_facts(sanitize(caption, self.cfg.max_caption_chars))
            ) <= set(normalize(text).split()):
                reason = "lost_facts"
        return (text, None) if reason is None else (None, reason)
