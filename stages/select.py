"""Score fusion (``select``): decide with any columns earlier stages wrote, in DuckDB SQL.

    - stage: select
      where: "face_area < 0.5 AND coalesce(nsfw, 0) < 0.1"   # a per-row condition (optional)
      score: "clip_score + 0.05 * aesthetic"                  # a per-row score (optional)
      fraction: 0.3                                           # keep the top 30% of the pool by score

``where`` drops rows for which it is not true (NULL counts as not true, as in SQL's WHERE) with
reason ``not_selected``. ``score`` with ``fraction`` keeps the top fraction of the whole pool (rows
that passed ``where``) by DataComp's rule, the score at index int(N x fraction) of the descending
sort, as ``clip_filter`` does; with ``threshold`` it keeps score >= threshold. Rows below get
``score_below_threshold``, rows whose score is NULL or NaN ``no_score``. The fitted threshold is
recorded, so changing ``fraction`` refits without touching any model. The columns the SQL names are
the stage's declared reads, so a typo is refused before anything runs.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pairsift.stages.base import Contract, PoolStage, ScoreSpec, StageConfig, with_reason
from pairsift.stages.clip_score import pool_threshold

NOT_SELECTED, BELOW_THRESHOLD, NO_SCORE = "not_selected", "score_below_threshold", "no_score"
SCORE = "select_score"


class SelectConfig(StageConfig):
    where: str | None = Field(None, description="DuckDB SQL condition over one row's columns")
    score: str | None = Field(None, description="DuckDB SQL expression over one row's columns")
    fraction: float | None = Field(None, gt=0, le=1, description="keep the pool's top fraction by score")
    threshold: float | None = Field(None, description="keep score >= threshold")

    @model_validator(mode="after")
    def _one_rule(self) -> SelectConfig:
        if self.where is None and self.score is None:
            raise ValueError("select needs a where condition, a score, or both")
        if self.score is not None and (self.fraction is None) == (self.threshold is None):
            raise ValueError("select: a score needs exactly one of fraction or threshold")
        if self.score is None and (self.fraction is not None or self.threshold is not None):
            raise ValueError("select: fraction and threshold rank rows by a score; give score too")
        for sql in (self.where, self.score):
            if sql is not None:
                columns_in(sql)  # a malformed expression is refused with the config, not on a worker
        return self


@functools.cache
def columns_in(sql: str) -> tuple[str, ...]:
    """The column names an expression refers to (identifiers that are not function calls)."""
    import duckdb

    try:
        tokens = duckdb.tokenize(sql)
    except Exception as exc:  # noqa: BLE001 - duckdb's own error types vary by version
        raise ValueError(f"cannot parse {sql!r}: {exc}") from None
    ends = [position for position, _ in tokens[1:]] + [len(sql)]
    texts = [sql[position:end].strip() for (position, _), end in zip(tokens, ends)]
    found: list[str] = []
    for index, ((_, kind), text) in enumerate(zip(tokens, texts)):
        if kind != duckdb.token_type.identifier:
            continue
        if index + 1 < len(texts) and texts[index + 1].startswith("("):
            continue  # a function, e.g. lower(caption)
        name = text[1:-1].replace('""', '"') if text.startswith('"') else text
        if name not in found:
            found.append(name)
    return tuple(found)


class Select(PoolStage):
    name: ClassVar[str] = "select"
    config_class: ClassVar[type[StageConfig]] = SelectConfig
    cfg: SelectConfig

    def contract(self) -> Contract:
        reads = tuple(dict.fromkeys(c for sql in (self.cfg.where, self.cfg.score) if sql for c in columns_in(sql)))
        writes = {SCORE: pa.float32()} if self.cfg.score else {}
        rule = "fixed" if self.cfg.fraction is None else f"top {self.cfg.fraction:.0%} of the pool"
        scores = {SCORE: ScoreSpec(f"score: {self.cfg.score}", threshold="threshold", rule=rule)} if writes else {}
        return Contract(reads=reads, writes=writes, reasons=(NOT_SELECTED, BELOW_THRESHOLD, NO_SCORE), scores=scores)

    def evaluate(self, shard: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(passes ``where``, score as float32 with NaN where missing) per row."""
        import duckdb

        where = f"coalesce(({self.cfg.where}), false)" if self.cfg.where else "true"
        score = f"CAST(({self.cfg.score}) AS FLOAT)" if self.cfg.score else "CAST(NULL AS FLOAT)"
        # The expressions are the config author's, but a row's values are the web's: no file or
        # network access from inside the query, whatever the SQL says.
        con = duckdb.connect(config={"enable_external_access": False})
        try:
            con.register("shard", shard.select([c for c in self.contract().reads if c in shard.column_names]
                                               or shard.column_names[:1]))
            result = con.sql(f"SELECT {where} AS passes, {score} AS score FROM shard").to_arrow_table()
        except duckdb.Error as exc:
            raise ValueError(f"select: {str(exc).splitlines()[0]}") from None
        finally:
            con.close()
        passes = result.column("passes").to_numpy(zero_copy_only=False).astype(bool)
        scores = result.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
        return passes, np.where(np.isfinite(scores), scores, np.nan).astype(np.float32)

    def partial(self, shard: pa.Table) -> pa.Table:
        passes, scores = self.evaluate(shard)
        kept = scores[passes & ~np.isnan(scores)]
        return pa.table({SCORE: pa.array(kept, pa.float32())})

    def fit(self, partials: list[pa.Table]) -> dict[str, Any]:
        if self.cfg.score is None or self.cfg.threshold is not None:
            return {"threshold": self.cfg.threshold}
        arrays = [p.column(SCORE).to_numpy() for p in partials if p.num_rows]
        scores = np.concatenate(arrays).astype(np.float32) if arrays else np.zeros(0, np.float32)
        assert self.cfg.fraction is not None
        return {"threshold": pool_threshold(scores, self.cfg.fraction), "pool_size": len(scores)}

    def apply(self, shard: pa.Table, fitted: dict[str, Any], partial: pa.Table) -> pa.Table:
        passes, scores = self.evaluate(shard)
        reasons: list[str | None] = []
        threshold = fitted.get("threshold")
        for ok, score in zip(passes, scores):
            if not ok:
                reasons.append(NOT_SELECTED)
            elif self.cfg.score is None:
                reasons.append(None)
            elif np.isnan(score):
                reasons.append(NO_SCORE)
            elif threshold is None or score < np.float32(threshold):
                reasons.append(BELOW_THRESHOLD)
            else:
                reasons.append(None)
        if self.cfg.score:
            shard = shard.append_column(SCORE, pa.array(scores, pa.float32(), mask=np.isnan(scores)))
        return with_reason(shard, reasons)
