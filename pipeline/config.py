"""The run config: YAML validated with pydantic before anything starts.

Every mistake is reported as one line naming the key's path (``stages[1] (download).timeout: ...``).
Each stage validates its own section with its ``config_class``; this module only knows the frame.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pairsift.common.overrides import OverrideError, set_dotted
from pairsift.common.storage import AnyPath, as_path
from pairsift.configs import CONFIGS_DIR
from pairsift.pipeline.contracts import check_columns
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.run_dir import check_label
from pairsift.stages import UnknownStage, stage_class
from pairsift.stages.base import StageConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(Strict):
    """Where the URL list is and how to read it."""

    path: str = Field(description="a file, a folder of files of one format, or a glob (data/*.parquet)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt", "webdataset"] = "auto"
    url_col: str = "url"
    caption_col: str | None = Field("caption", description="None = a URL-only list: captions are null")
    shard_size: int = Field(10_000, gt=0, description="rows per input shard: the unit of work")
    spread_domains: bool = Field(
        False, description="deal each domain's rows over all the shards, so no download worker gets a big "
                           "domain's whole run (ingest reads the input twice and spills it once to disk)")
    # A webdataset input is attacker-sized: a sparse or gzip'd tar declares GBs in a few KB.
    max_member_bytes: int = Field(64 << 20, gt=0, description="largest tar member read; larger: member_too_large")
    max_tar_bytes: int = Field(16 << 30, gt=0, description="most bytes one tar may unpack to; past it ingest stops")


class RayConfig(Strict):
    address: str | None = Field(None, description="join this cluster; None starts Ray locally")
    node_ip: str = Field("127.0.0.2", description="loopback address a local Ray advertises (its ports listen on "
                                                  "every interface: token auth is what closes them)")
    num_cpus: int | None = Field(None, gt=0)
    # A local Ray always gets a mode (token unless disabled here explicitly), never whatever an
    # earlier run's ~/.ray/auth_token implies. Joining a cluster, None uses the exported RAY_AUTH_MODE.
    auth_mode: Literal["disabled", "token"] | None = Field(
        None, description="None: token auth with a fresh token for a local Ray; the exported RAY_AUTH_MODE "
                          "when joining. disabled: an explicit opt-out (anyone on the machine can use the Ray)")


class ExecutorConfig(Strict):
    kind: Literal["ray", "local"] = "ray"
    max_retries: int = Field(2, ge=0, description="extra attempts for a failing shard")
    shard_timeout_s: float = Field(1800.0, gt=0, description="a shard past this is retried or failed")
    max_workers: int | None = Field(None, gt=0, description="cap on concurrent shards per stage")
    # A resolver outage makes every URL look dead. Rather than quietly marking most of the pool as
    # failed, stop with one line once a reason's share of a stage's rows passes its limit. Stages
    # declare their own limits (Contract.abort_shares); these add to or override them.
    abort_on_reason: dict[str, float] = Field(
        default_factory=dict,
        description="reason -> largest share of a stage's rows it may take before the run stops",
    )
    abort_min_rows: int = Field(1000, gt=0, description="rows a stage must have seen before abort_on_reason applies")


class ShardsConfig(Strict):
    samples_per_shard: int = Field(10_000, gt=0)
    # Every caption written for the trainer (the alt-text and the caption columns stages declare) must fit the text
    # encoder's context: CLIP's is 77 tokens including its start and end tokens.
    max_caption_tokens: int | None = Field(77, gt=2, description="None = write captions as they are")
    long_captions: Literal["truncate", "drop"] = Field(
        "truncate", description="truncate at a word boundary, or drop the caption (a sample whose alt-text "
                                "is dropped leaves the shards with reason caption_too_long_for_context)")
    json_columns: list[str] | None = Field(
        None, description="catalog columns copied into each sample's json; None = all scalar ones"
    )


class StageSpec(Strict):
    """One entry of ``stages:``: the stage's name, an optional label, and its validated config."""

    stage: str
    label: str
    config: StageConfig


class RunConfig(Strict):
    run_dir: str
    input: InputConfig
    ray: RayConfig = RayConfig()
    executor: ExecutorConfig = ExecutorConfig()
    stages: list[StageSpec] = []
    shards: ShardsConfig = ShardsConfig()

    def stage_hashes(self) -> dict[str, str]:
        """Per-stage hash chained through every stage before it: editing one stage's config
        changes its hash and every later one, never an earlier one."""
        hashes: dict[str, str] = {}
        previous = config_hash(self.input.model_dump() | {"fingerprint": input_fingerprint(self.input.path)})
        hashes["ingest"] = previous
        for spec in self.stages:
            previous = config_hash({"stage": spec.stage, "config": spec.config.model_dump(), "after": previous})
            hashes[spec.label] = previous
        hashes["shards"] = config_hash({"shards": self.shards.model_dump(), "after": previous})
        return hashes

    def labels(self) -> list[str]:
        """Every stage's folder in the run directory, in pipeline order."""
        return ["ingest"] + [s.label for s in self.stages]

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(exclude={"stages"})
        data["stages"] = [{"stage": s.stage, "label": s.label, **s.config.model_dump()} for s in self.stages]
        return data


def input_fingerprint(path: str) -> list[tuple[str, int, int]]:
    """Size and mtime of the input file(s): a rewritten list must be ingested again."""
    try:
        root = as_path(path)
        files = sorted(root.glob("*.tar")) if root.is_dir() else [root]
    except (ValueError, OSError):
        return []  # ingest says what is wrong with the input, in one line
    out = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        out.append((file.name, stat.st_size, stat.st_mtime_ns))
    return out


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(err: ValidationError, prefix: str = "") -> str:
    first = err.errors()[0]
    where = _where(first["loc"])
    where = f"{prefix}.{where}" if prefix and where else (prefix or where)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {message}{more}"


def parse_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a config mapping; raise UserError with one line on the first problem."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    raw_stages = data.pop("stages", []) or []
    if not isinstance(raw_stages, list):
        raise UserError(f"{source}: stages: expected a list of stage entries")
    specs: list[StageSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw_stages):
        where = f"stages[{index}]"
        if not isinstance(entry, dict) or "stage" not in entry:
            raise UserError(f"{source}: {where}: each stage entry needs a 'stage:' key naming the stage")
        entry = dict(entry)
        name = entry.pop("stage")
        label = entry.pop("label", name)
        try:
            cls = stage_class(str(name))
        except UnknownStage as exc:
            raise UserError(f"{source}: {where}: {exc.args[0]}") from None
        try:
            check_label(label)
        except UserError as exc:
            raise UserError(f"{source}: {where}: {exc}") from None
        if label in seen or label in ("ingest", "shards", "report", "takedown", "takedowns"):
            raise UserError(f"{source}: {where}: stage label {label!r} is used twice; give one a 'label:'")
        seen.add(label)
        try:
            stage_cfg = cls.config_class(**entry)
        except ValidationError as exc:
            raise UserError(f"{source}: {_first_error(exc, f'{where} ({name})')}") from None
        specs.append(StageSpec.model_construct(stage=name, label=label, config=stage_cfg))
    try:
        cfg = RunConfig(**data)
    except ValidationError as exc:
        raise UserError(f"{source}: {_first_error(exc)}") from None
    cfg.stages = specs
    check_columns(specs, images_in_input(cfg.input), source)
    return cfg


def images_in_input(source: InputConfig) -> bool:
    """Whether ingest stores images (webdataset tars), so that stages may read them without a download."""
    if source.format != "auto":
        return source.format == "webdataset"
    path = source.path.rstrip("/")
    if path.endswith((".tar", ".tar.gz", ".tgz", "*.tar")):
        return True
    try:
        root = as_path(path)
        return root.is_dir() and any(root.glob("*.tar"))
    except (ValueError, OSError):
        return False


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: anchor/alias expansion is a classic YAML bomb."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def resolve_config_path(name_or_path: str) -> AnyPath:
    """A path or URL (s3://bucket/job.yaml), or the short name of a preset in configs/ (``demo``)."""
    try:
        path = as_path(name_or_path)
        if path.exists():
            return path
    except (ValueError, OSError) as exc:
        raise UserError(f"config {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    preset = CONFIGS_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise UserError(f"config {name_or_path!r} not found: not a file, and not a preset (presets: {known})")


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = resolve_config_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        raise UserError(f"{path}: the config is empty")
    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            _set_dotted(data, dotted, value)
    return parse_config(data, source=str(path))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c``; ``stages.<label>.key`` addresses the stage entry with that label (or name)."""
    keys = dotted.split(".")
    if keys[0] == "stages" and len(keys) >= 3:
        entries = data.get("stages") or []
        matches = [e for e in entries if isinstance(e, dict) and e.get("label", e.get("stage")) == keys[1]]
        if not matches:
            labels = ", ".join(str(e.get("label", e.get("stage"))) for e in entries if isinstance(e, dict))
            raise UserError(f"override {dotted}: no stage labelled {keys[1]!r} (stages: {labels})")
        data, keys = matches[0], keys[2:]
    try:
        set_dotted(data, ".".join(keys), value)
    except OverrideError as exc:
        raise UserError(str(exc)) from None
