"""Small stages for executor tests: real Stage subclasses with behaviour that is easy to predict."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pairsift.stages.base import Contract, PoolStage, Stage, StageConfig, with_reason


class CaptionLengthConfig(StageConfig):
    min_chars: int = 0
    sleep_s: float = 0.0  # slow the stage down so a test can kill the run mid-way
    fail_on_shard_with: str | None = None  # raise when a caption equals this (a "bad shard")
    fail_flag_file: str | None = None  # ...only while this file exists
    every_row_reason: str | None = None  # drop every row with this reason (an outage, say)


class CaptionLength(Stage):
    """Adds caption_len; drops captions shorter than min_chars with reason too_short."""

    name = "caption_length"
    config_class = CaptionLengthConfig

    def contract(self) -> Contract:
        return Contract(reads=("caption",), writes={"caption_len": pa.int32()},
                        reasons=("too_short", *([self.cfg.every_row_reason] if self.cfg.every_row_reason else [])))

    def __call__(self, shard: pa.Table) -> pa.Table:
        time.sleep(self.cfg.sleep_s)
        captions = shard.column("caption").to_pylist()
        if self.cfg.fail_on_shard_with in captions and (
            self.cfg.fail_flag_file is None or Path(self.cfg.fail_flag_file).exists()
        ):
            raise RuntimeError(f"poisoned shard (pid {os.getpid()})")
        lengths = pc.utf8_length(shard.column("caption"))
        out = shard.append_column("caption_len", lengths)
        if self.cfg.every_row_reason:
            return with_reason(out, [self.cfg.every_row_reason] * shard.num_rows)
        return with_reason(out, [None if (n or 0) >= self.cfg.min_chars else "too_short" for n in lengths.to_pylist()])


class TopFractionConfig(StageConfig):
    fraction: float = 0.5


class TopFractionByLength(PoolStage):
    """Keeps the longest `fraction` of captions over the whole pool (a global threshold)."""

    name = "top_fraction"
    config_class = TopFractionConfig
    stateful = True

    def contract(self) -> Contract:
        return Contract(reads=("caption_len",), writes={"length_threshold": pa.int64()}, reasons=("below_threshold",))

    def partial(self, shard: pa.Table) -> pa.Table:
        return pa.table({"caption_len": shard.column("caption_len")})

    def fit(self, partials: list[pa.Table]) -> dict[str, Any]:
        lengths = sorted((v for p in partials for v in p.column("caption_len").to_pylist()), reverse=True)
        index = min(len(lengths) - 1, int(len(lengths) * self.cfg.fraction))
        return {"threshold": lengths[index] if lengths else 0, "pool": len(lengths),
                "lengths": pa.table({"caption_len": lengths})}

    def apply(self, shard: pa.Table, fitted: dict[str, Any], partial: pa.Table) -> pa.Table:
        assert isinstance(fitted["lengths"], pa.Table)
        keep = [n >= fitted["threshold"] for n in shard.column("caption_len").to_pylist()]
        return with_reason(shard.append_column("length_threshold", pa.array([fitted["threshold"]] * shard.num_rows)),
                           [None if k else "below_threshold" for k in keep])


TOY_STAGES = {"caption_length": "toy_stages:CaptionLength", "top_fraction": "toy_stages:TopFractionByLength"}
