"""`pairsift verify RUN`: check a finished run on its own, from what is on disk.

Every tar opens and its members match its parquet; sizes.json and __len__ match the tars; every uid appears
once; per stage, rows in = kept + dropped with a reason, and each stage saw exactly the rows the
stage before it kept; the training shards hold exactly the kept samples, less those a takedown
removed (``takedowns.parquet``), and none of those; no temporary file is left.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.compute as pc

from pairsift.common.images import IMAGE_MEMBER_EXTENSIONS
from pairsift.common.storage import AnyPath, read_parquet
from pairsift.common.tars import TarError, members_of, split_name
from pairsift.pipeline.maintenance import taken_down_uids
from pairsift.pipeline.run_dir import RunDir, stage_labels


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checked: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < 100:
            self.problems.append(text)


def _tar_keys(path: AnyPath, report: VerifyReport) -> list[str]:
    members: dict[str, set[str]] = {}
    try:
        for member in members_of(path):
            key, ext = split_name(member.name)
            members.setdefault(key, set()).add(ext)
            if not member.is_file() or len(member.read()) != member.size:
                report.problem(f"{path.name}: member {member.name} is truncated")
    except (TarError, OSError) as exc:
        report.problem(f"{path.name}: does not open as a tar: {exc}")
        return []
    for key, exts in members.items():
        if "txt" not in exts or "json" not in exts or not exts & set(IMAGE_MEMBER_EXTENSIONS):
            report.problem(f"{path.name}: sample {key} lacks an image, txt or json member ({sorted(exts)})")
    return list(members)


def verify_run(run_root: str | AnyPath) -> VerifyReport:
    run = RunDir(run_root)
    report = VerifyReport()
    meta = run.read_run_json()
    labels = stage_labels(meta["config"])
    n_shards = json.loads(run.manifest.read_text())["n_shards"]

    for tmp in run.temp_files():
        report.problem(f"temporary file left behind: {tmp.relative_to(run.root)}")

    all_uids: Counter = Counter()
    kept_after_last: list[str] = []
    for shard in range(n_shards):
        alive: list[str] | None = None
        for label in labels:
            part = run.part(label, shard)
            if run.read_done(part) is None or not part.exists():
                failed = run.read_failed(part)
                report.problem(f"{label} shard {shard}: " + (f"failed: {failed.error}" if failed else "missing"))
                alive = None
                break
            table = read_parquet(part)
            uids = table.column("uid").to_pylist()
            if label == "ingest":
                all_uids.update(uids)
            elif uids != alive:
                report.problem(f"{label} shard {shard}: saw {len(uids)} rows, the stage before kept {len(alive or [])}")
            if "reason" in table.column_names:
                keep_mask = pc.is_null(table.column("reason"))
                alive = [u for u, k in zip(uids, keep_mask.to_pylist()) if k]
            else:
                alive = uids
            done = run.read_done(part)
            if done and done.rows_in != len(uids):
                report.problem(f"{label} shard {shard}: marker says {done.rows_in} rows, the part has {len(uids)}")
            report.checked["parts"] += 1
        if alive is not None:
            kept_after_last.extend(alive)

    for uid, count in all_uids.items():
        if count > 1:
            report.problem(f"uid {uid} appears {count} times in the input parts")
    taken_down = taken_down_uids(run.root)
    if taken_down:
        report.checked["taken-down samples"] = len(taken_down)
    _verify_shards(run, report, [u for u in kept_after_last if u not in taken_down], taken_down)
    return report


def _verify_length(run: RunDir, report: VerifyReport, sizes: dict[str, int]) -> None:
    """``__len__`` is the sample count open_clip trains on when it is given the shards folder."""
    try:
        length = int(run.shards.length_path.read_text())
    except (OSError, ValueError):
        report.problem("shards/__len__ is missing or unreadable")
        return
    if length != sum(sizes.values()):
        report.problem(f"shards/__len__ says {length}, sizes.json adds up to {sum(sizes.values())}")


def _verify_shards(run: RunDir, report: VerifyReport, kept: list[str], taken_down: set[str]) -> None:
    if not run.shards.sizes_path.exists():
        report.problem(f"{run.shards.sizes_path.relative_to(run.root)} is missing")
        return
    sizes = run.shards.read_sizes()
    _verify_length(run, report, sizes)
    seen: Counter = Counter()
    for name, size in sorted(sizes.items()):
        tar_path = run.shards.named(name)
        keys = _tar_keys(tar_path, report)
        table_path = run.shards.table_of(tar_path)
        uids = read_parquet(table_path, ["uid"]).column("uid").to_pylist() if table_path.exists() else []
        if not table_path.exists():
            report.problem(f"{table_path.name} is missing")
        if keys != uids:
            report.problem(f"{name}: tar members and {table_path.name} rows differ")
        if len(keys) != size:
            report.problem(f"{name}: sizes.json says {size}, the tar holds {len(keys)}")
        seen.update(keys)
        report.checked["shards"] += 1
        report.checked["samples"] += len(keys)
    extra = sorted(p.name for p in run.shards.tars() if p.name not in sizes)
    if extra:
        report.problem(f"tars not listed in sizes.json: {extra[:5]}")
    duplicated = [u for u, c in seen.items() if c > 1]
    if duplicated:
        report.problem(f"{len(duplicated)} samples appear in more than one shard")
    missing = set(kept) - set(seen)
    # Kept rows the shard writer could not use (no image in a text-only run; an alt-text too long for the
    # text encoder under `long_captions: drop`) are counted in the shard markers, not lost.
    unusable = sum(n for m in run.done_markers("shards")
                   for reason, n in json.loads(m.read_text()).get("dropped", {}).items()
                   if reason in ("no_image", "caption_too_long_for_context"))
    if len(missing) != unusable:
        report.problem(f"{len(missing) - unusable} kept samples are not in any shard")
    still = taken_down & set(seen)
    if still:
        report.problem(f"{len(still)} taken-down samples are still in the shards; rerun `pairsift takedown` to finish")
    unexpected = set(seen) - set(kept) - still
    if unexpected:
        report.problem(f"{len(unexpected)} samples in the shards were not kept by the pipeline")
