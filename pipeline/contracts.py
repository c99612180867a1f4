"""What the engine asks of a configured pipeline's stage contracts, before and while it runs.

Nothing here names a stage, a column or a reason: each comes from a stage's ``contract()`` (see
``pairsift.stages.base.Contract``) or from ingest's. The config is checked before Ray starts (a
stage that reads a column no earlier stage writes is one line, not a worker's traceback), each
worker reads only the columns its stage uses, and retry, the shard writer and the abort rule ask
the contracts for their reasons and columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pairsift.pipeline.errors import UserError
from pairsift.stages import stage_class
from pairsift.stages.base import IMAGE, REASON, Contract
from pairsift.stages.ingest import INGEST_CONTRACT

if TYPE_CHECKING:
    from pairsift.pipeline.config import StageSpec


def contract_of(spec: StageSpec) -> Contract:
    return stage_class(spec.stage)(spec.config).contract()


def contracts(specs: Sequence[StageSpec]) -> list[Contract]:
    return [contract_of(spec) for spec in specs]


def check_columns(specs: Sequence[StageSpec], images_in_input: bool, source: str = "config") -> None:
    """Every column a stage reads is written by ingest or a stage before it (one line if not).
    ``images_in_input``: the input holds the images (webdataset tars), so nothing needs to fetch them."""
    available = set(INGEST_CONTRACT.writes) | ({IMAGE} if images_in_input else set())
    later = {}  # column -> the first stage writing it, to say where it would come from
    for spec, contract in zip(specs, contracts(specs)):
        for column in contract.writes:
            later.setdefault(column, spec.label)
    for index, (spec, contract) in enumerate(zip(specs, contracts(specs))):
        missing = [c for c in contract.reads if c not in available]
        if missing:
            hint = "; ".join(f"{c} is written by {later[c]}, which must come before it" if c in later
                             else f"no stage writes {c}" for c in missing)
            raise UserError(f"{source}: stages[{index}] ({spec.label}) reads {', '.join(missing)}, which no "
                            f"earlier stage writes ({hint})")
        available |= set(contract.writes)


def columns_to_read(specs: Sequence[StageSpec], index: int) -> set[str] | None:
    """The columns stage ``index`` uses from the earlier parts (plus uid and each part's reason,
    which decide the rows still alive); None = every column (the shard writer)."""
    if index >= len(specs):
        return None
    contract = contract_of(specs[index])
    return {"uid", REASON, *contract.reads, *contract.optional} - {IMAGE}


def caption_columns(specs: Iterable[StageSpec]) -> tuple[str, ...]:
    """Columns the trainer reads as captions besides the alt-text, in pipeline order."""
    return tuple(c for contract in contracts(list(specs)) for c in contract.captions)


def bulky_columns(specs: Iterable[StageSpec]) -> frozenset[str]:
    """Columns too big for a sample's json in the training shards."""
    out = set(INGEST_CONTRACT.bulky) | {IMAGE}
    for contract in contracts(list(specs)):
        out |= set(contract.bulky)
    return frozenset(out)


def abort_shares(specs: Iterable[StageSpec], configured: dict[str, float]) -> dict[str, float]:
    """The stages' declared environment-failure limits, overridden by the config's."""
    shares: dict[str, float] = {}
    for contract in contracts(list(specs)):
        shares |= contract.abort_shares
    return shares | configured
