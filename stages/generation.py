"""What the generating stages (``rewrite``, ``enrich``) share: seeds, row keys, prompts, the meter.

All draws are seeded by (seed, uid), so a caption's outputs do not depend on the shard layout and a
rerun repeats them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pairsift.stages.base import REASON
from pairsift.stages.engines import Completion, Engine, EngineConfig, Prompt, SamplingParams

log = logging.getLogger(__name__)

PROMPTS = Path(__file__).parent / "prompts"


def read_prompt(name: str) -> str:
    return (PROMPTS / name).read_text(encoding="utf-8").strip()


def row_seed(seed: int, uid: str, *parts: object) -> int:
    """A 63-bit seed from (seed, uid, parts): the same for a row wherever and whenever it runs."""
    key = ":".join([str(seed), uid, *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def row_keys(shard: pa.Table) -> list[str]:
    if "uid" in shard.column_names:
        return [str(u) for u in shard.column("uid").to_pylist()]
    captions = shard.column("caption").to_pylist() if "caption" in shard.column_names else [None] * len(shard)
    return [hashlib.blake2b(str(c).encode(), digest_size=16).hexdigest() for c in captions]


def alive(shard: pa.Table) -> list[bool]:
    if REASON not in shard.column_names:
        return [True] * shard.num_rows
    return [r is None for r in shard.column(REASON).to_pylist()]


@dataclass
class Meter:
    """Generation counters for the log line and the tests."""

    label: str = "recaption"
    prompts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    flags: Counter = field(default_factory=Counter)

    def run(
        self, engine: Engine, prompts: list[Prompt], params: SamplingParams, batch: int
    ) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(prompts), batch):
            began = time.perf_counter()
            chunk = engine.generate(prompts[start : start + batch], params)
            seconds = time.perf_counter() - began
            tokens = sum(c.completion_tokens for c in chunk)
            self.seconds += seconds
            self.prompts += len(chunk)
            self.tokens += tokens
            out.extend(chunk)
            log.info(  # progress inside a shard: one engine call can take minutes
                "%s: %d/%d prompts, %d new tokens in %.1f s (%.0f tokens/s)",
                self.label,
                start + len(chunk),
                len(prompts),
                tokens,
                seconds,
                tokens / max(seconds, 1e-9),
            )
        return out

    def mark(self) -> tuple[int, float]:
        """The counters now, for ``log_shard`` after the shard's generation."""
        return self.tokens, self.seconds

    def log_shard(self, rows: int, kept: int, noun: str, before: tuple[int, float]) -> None:
        """One line per shard: what the generation since ``before`` kept, and at what speed."""
        tokens, seconds = self.tokens - before[0], self.seconds - before[1]
        rate = tokens / seconds if seconds else 0.0
        log.info("%s: %d rows, %d %s, %d tokens in %.1f s (%.0f tokens/s)",
                 self.label, rows, kept, noun, tokens, seconds, rate)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def engine_gpus(gpus: float, engine: EngineConfig | None) -> float:
    if engine is not None and engine.backend == "vllm":
        return max(gpus, float(engine.tensor_parallel_size))
    return gpus
