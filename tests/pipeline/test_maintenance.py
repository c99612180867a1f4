"""Subsets and takedowns of a finished run, from its shards on disk: no download, no decode.

One small real run (synthetic web served on 127.0.0.1, text filter, download, image filter, in-process
executor) is built once; every test that changes it works on its own copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from pairsift.pipeline import maintenance
from pairsift.pipeline.catalog import query
from pairsift.pipeline.config import load_config
from pairsift.pipeline.errors import UserError
from pairsift.pipeline.maintenance import subset, takedown
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.serve import free_port, serve
from pairsift.pipeline.synth import synthesize
from pairsift.pipeline.verify import verify_run

STAGES = [
    {"stage": "text_filter", "min_chars": 5, "min_words": 2, "languages": ["en"], "dedup": "url"},
    {"stage": "download", "image_size": 32, "encode_format": "jpg", "timeout_s": 5, "deadline_s": 10,
     "thread_count": 8, "allow_loopback": True},
    {"stage": "image_filter", "min_side": 16, "max_aspect_ratio": 3.0},
]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run of 300 rows in 3 input shards, written as 6 training shards of up to 40."""
    root = tmp_path_factory.mktemp("maintenance")
    port = free_port()
    synthesize(root / "corpus", n=300, seed=5, base_url=f"http://127.0.0.1:{port}", seed_size=0, test_per_concept=0)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(root / "run"), "input": {"path": str(root / "corpus/urls.parquet"), "shard_size": 100},
        "executor": {"kind": "local", "max_retries": 0}, "stages": STAGES, "shards": {"samples_per_shard": 40}}))
    with serve(root / "corpus", port=port):
        summary = run_pipeline(load_config(str(config)))
    assert not summary.failed and summary.output_shards >= 4
    return root / "run", config


@pytest.fixture
def run(source, tmp_path) -> Path:
    shutil.copytree(source[0], tmp_path / "run")
    return tmp_path / "run"


# --- helpers ---------------------------------------------------------------------------------

def members(tar_path: Path) -> list[tuple[str, int, int, int, bytes]]:
    """Every member with the header fields a copy must keep, and its bytes."""
    with tarfile.open(tar_path) as tar:
        return [(m.name, m.size, m.mtime, m.mode, tar.extractfile(m).read()) for m in tar]


def key(name: str) -> str:
    return name.split(".", 1)[0]


def shard_tables(shards: Path) -> dict[str, pa.Table]:
    return {p.with_suffix(".tar").name: pq.read_table(p) for p in sorted(shards.glob("_meta/[0-9]*.parquet"))}


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by name (a shards folder's names are unique across _meta/ and _markers/)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_list(path: Path, column: str, values: list[str]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"note": ["x"] * len(values), column: values}), path)
    elif path.suffix == ".csv":
        pacsv.write_csv(pa.table({"note": ["x"] * len(values), column: values}), path)
    else:
        path.write_text("# one per line\n" + "\n".join(values) + "\n\n")
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Subset and takedown copy image bytes: any attempt to decode one fails the test."""
    import PIL.Image

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(PIL.Image, "open", refuse)


# --- subset ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["txt", "csv", "parquet"])
def test_subset_by_uids_copies_exactly_those_samples_byte_for_byte(source, tmp_path, fmt, no_decoding):
    shards = source[0] / "shards"
    tables = shard_tables(shards)
    names = sorted(tables)
    first, third = (tables[n].column("uid").to_pylist() for n in (names[0], names[2]))
    chosen = set(first[::3] + third[:5])
    listed = write_list(tmp_path / f"uids.{fmt}", "uid", sorted(chosen) + ["0" * 32])  # the last is in no shard

    summary = subset(source[0], listed, None, False, tmp_path / "out")

    total = sum(t.num_rows for t in tables.values())
    assert (summary.samples_in, summary.samples_out, summary.shards_out, summary.not_found) == (total, len(chosen), 2, 1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    for out_name, src_name in (("00000.tar", names[0]), ("00001.tar", names[2])):
        expected = [m for m in members(shards / src_name) if key(m[0]) in chosen]
        got = members(out / out_name)
        assert got == expected  # same names, sizes, header fields and bytes, in the same order
        assert Counter(n.rsplit(".", 1)[1] for n, *_ in got) == {"jpg": len(got) // 3, "txt": len(got) // 3,
                                                                "json": len(got) // 3}
        table = pq.read_table(out / "_meta" / out_name.replace(".tar", ".parquet"))
        assert table.column("uid").to_pylist() == list(dict.fromkeys(key(n) for n, *_ in got))
        source_rows = tables[src_name].to_pylist()
        assert table.to_pylist() == [r for r in source_rows if r["uid"] in chosen]
    sizes = json.loads((out / "_meta/sizes.json").read_text())
    assert sizes == {"00000.tar": len(first[::3]), "00001.tar": 5}
    provenance = json.loads((out / "_meta/subset.json").read_text())
    assert (provenance["by"], provenance["exclude"], provenance["samples_out"]) == ("uid", False, len(chosen))


def test_subset_exclude_by_urls_keeps_everything_else(source, tmp_path, no_decoding):
    shards = source[0] / "shards"
    tables = shard_tables(shards)
    rows = [r for t in tables.values() for r in t.select(["uid", "url"]).to_pylist()]
    dropped = rows[5::17]  # spread over every shard
    listed = write_list(tmp_path / "urls.parquet", "url", [r["url"] for r in dropped])

    summary = subset(source[0], None, listed, True, tmp_path / "out")

    assert summary.samples_out == len(rows) - len(dropped) and summary.not_found == 0
    gone = {r["uid"] for r in dropped}
    out = tmp_path / "out"
    sizes = json.loads((out / "_meta/sizes.json").read_text())
    assert sizes == {name: tables[name].num_rows - sum(u in gone for u in tables[name].column("uid").to_pylist())
                     for name in sorted(tables)}
    for name in sizes:
        got = members(out / name)
        assert got == [m for m in members(shards / name) if key(m[0]) not in gone]
        assert pq.read_table(out / "_meta" / name.replace(".tar", ".parquet")).column("uid").to_pylist() == \
            [u for u in tables[name].column("uid").to_pylist() if u not in gone]


def test_subset_into_an_earlier_subset_replaces_it(source, tmp_path):
    out = tmp_path / "out"
    uids = shard_tables(source[0] / "shards")["00003.tar"].column("uid").to_pylist()
    subset(source[0], None, write_list(tmp_path / "u.txt", "url", ["http://nothing/"]), True, out)
    assert len(list(out.glob("*.tar"))) == len(json.loads((source[0] / "shards/_meta/sizes.json").read_text()))

    summary = subset(source[0], write_list(tmp_path / "uids.txt", "uid", uids[:3]), None, False, out)

    assert summary.shards_out == 1
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "__len__", "_meta"]
    assert sorted(p.name for p in (out / "_meta").iterdir()) == ["00000.parquet", "sizes.json", "subset.json"]
    assert (out / "__len__").read_text() == "3"
    assert [key(m[0]) for m in members(out / "00000.tar")][::3] == uids[:3]
    # a subset of a subset: the shards directory itself is a valid source
    again = subset(out, write_list(tmp_path / "one.txt", "uid", uids[:1]), None, False, tmp_path / "again")
    assert again.samples_out == 1


def test_subset_rejects_bad_lists_and_outputs(source, tmp_path):
    uids = write_list(tmp_path / "uids.txt", "uid", ["a" * 32])
    with pytest.raises(UserError, match="exactly one of"):
        subset(source[0], uids, uids, False, tmp_path / "out")
    with pytest.raises(UserError, match="exactly one of"):
        subset(source[0], None, None, False, tmp_path / "out")
    urls_as_uids = write_list(tmp_path / "urls.txt", "url", ["http://127.0.0.1/x.jpg"])
    with pytest.raises(UserError, match=r"line 2: .* is not a uid"):
        subset(source[0], urls_as_uids, None, False, tmp_path / "out")
    with pytest.raises(UserError, match="no such file"):
        subset(source[0], tmp_path / "missing.txt", None, False, tmp_path / "out")
    no_column = write_list(tmp_path / "list.parquet", "link", ["http://127.0.0.1/x.jpg"])
    with pytest.raises(UserError, match="has no 'url' column"):
        subset(source[0], None, no_column, False, tmp_path / "out")
    with pytest.raises(UserError, match="must not be the run"):
        subset(source[0], uids, None, False, source[0] / "shards")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        subset(source[0], uids, None, False, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.md").read_text() == "mine"


# --- takedown --------------------------------------------------------------------------------

def takedown_list(run: Path, tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, str | None]]:
    """Urls of 2 samples in one shard, 1 in another, one url shared by a kept sample and a later
    duplicate the text filter dropped, one of a sample the image filter dropped after download (its
    image is stored, it is in no training shard), and one url not in the run.
    Returns the list, uid -> url of every row taken down, and uid -> its training shard (or None)."""
    tables = shard_tables(run / "shards")
    names = sorted(tables)
    ingest = pa.concat_tables([pq.read_table(p, columns=["uid", "url"]) for p in sorted((run / "ingest").glob("part-*.parquet"))])
    counts = Counter(ingest.column("url").to_pylist())
    in_shards = {u: (uid, name) for name in names for uid, u in zip(tables[name].column("uid").to_pylist(),
                                                                   tables[name].column("url").to_pylist())}
    shared = next(u for u, n in counts.items() if n > 1 and u in in_shards and in_shards[u][1] == names[1])
    picked = [u for u in tables[names[1]].column("url").to_pylist() if counts[u] == 1][:2]
    filtered = pq.read_table(run / "image_filter/part-00001.parquet", columns=["uid", "reason"]).to_pylist()
    dropped_uid = next(r["uid"] for r in filtered if r["reason"] is not None)
    dropped_url = ingest.filter(pc.equal(ingest.column("uid"), dropped_uid)).column("url")[0].as_py()
    picked += [tables[names[3]].column("url")[4].as_py(), shared, dropped_url]
    urls = picked + ["http://127.0.0.1:1/not-in-the-run.jpg"]
    uid_url = {uid: u for uid, u in zip(ingest.column("uid").to_pylist(), ingest.column("url").to_pylist()) if u in picked}
    where = {uid: (in_shards[u][1] if in_shards.get(u, ("", ""))[0] == uid else None) for uid, u in uid_url.items()}
    assert len(uid_url) == 6 and sum(w is None for w in where.values()) == 2
    return write_list(tmp_path / "takedown.txt", "url", urls), uid_url, where


def image_keys(run: Path) -> set[str]:
    return {key(m[0]) for tar in sorted((run / "download").glob("*.tar")) for m in members(tar)}


def test_takedown_removes_exactly_the_listed_samples(run, tmp_path, no_decoding):
    listed, uid_url, where = takedown_list(run, tmp_path)
    before = {name: members(run / "shards" / name) for name in shard_tables(run / "shards")}
    tables = shard_tables(run / "shards")
    files = digests(run / "shards")
    sizes = json.loads((run / "shards/_meta/sizes.json").read_text())
    images = image_keys(run)
    touched = {w for w in where.values() if w}

    summary = takedown(run, listed)

    assert (summary.urls_listed, summary.urls_not_found, summary.uids_added) == (6, 1, 6)
    assert (summary.samples_removed, summary.shards_rewritten, summary.logged) == (4, 2, 6)
    gone = set(uid_url)
    after = digests(run / "shards")
    for name in tables:
        stem = name.split(".")[0]
        if name not in touched:  # untouched shards are the same files, byte for byte
            assert all(after[f"{stem}.{ext}"] == files[f"{stem}.{ext}"] for ext in ("tar", "parquet", "done.json"))
            continue
        assert members(run / "shards" / name) == [m for m in before[name] if key(m[0]) not in gone]
        table = pq.read_table(run / "shards/_meta" / f"{stem}.parquet")
        assert table.to_pylist() == [r for r in tables[name].to_pylist() if r["uid"] not in gone]
        done = json.loads((run / "shards/_markers" / f"{stem}.done.json").read_text())
        removed = sum(w == name for w in where.values())
        assert (done["kept"], done["dropped"]["takedown"]) == (table.num_rows, removed)
        sizes[name] -= removed
    assert json.loads((run / "shards/_meta/sizes.json").read_text()) == sizes
    assert int((run / "shards/__len__").read_text()) == sum(sizes.values())  # open_clip's count follows
    # the stored images are gone too, the image filter's reject's included; every other image stays
    # (the duplicate the text filter dropped was never downloaded)
    assert image_keys(run) == images - gone and len(images & gone) == 5

    log = [json.loads(line) for line in (run / "takedowns.jsonl").read_text().splitlines()]
    assert {(e["uid"], e["url"], e["shard"]) for e in log} == {(u, uid_url[u], where[u]) for u in gone}
    assert set(pq.read_table(run / "takedowns.parquet").column("uid").to_pylist()) == gone

    # the same list again changes nothing, even after a crash cut the log's last line short
    with open(run / "takedowns.jsonl", "a") as handle:
        handle.write('{"time": 1, "uid": "ab')
    state = digests(run / "shards"), digests(run / "download")
    again = takedown(run, listed)
    assert (again.uids_added, again.samples_removed, again.logged) == (0, 0, 0)
    assert (digests(run / "shards"), digests(run / "download")) == state
    assert [json.loads(line) for line in (run / "takedowns.jsonl").read_text().splitlines()] == log


def test_takedown_shows_in_catalog_and_verifies(run, source, tmp_path):
    """Needs the lead's catalog.py / verify.py / shards.py change (/work/brief/takedown_catalog.patch)."""
    listed, uid_url, where = takedown_list(run, tmp_path)
    (kept_before,), = query(run, "SELECT count(*) FROM samples WHERE reason IS NULL")[1]

    takedown(run, listed)

    report = verify_run(run)
    assert report.ok, report.problems
    assert report.checked["taken-down samples"] == 6
    _, rows = query(run, "SELECT uid, reason, dropped_at FROM samples WHERE reason = 'takedown'")
    assert {r[0] for r in rows} == set(uid_url) and {r[1:] for r in rows} == {("takedown", "takedown")}
    (kept_after,), = query(run, "SELECT count(*) FROM samples WHERE reason IS NULL")[1]
    assert kept_after == kept_before - sum(w is not None for w in where.values())
    assert query(run, "SELECT count(*) FROM samples")[1] == [(300,)]

    # rewriting the shards later (here: another shard size) must not bring a taken-down sample back
    summary = run_pipeline(load_config(str(source[1]), {"run_dir": str(run), "shards.samples_per_shard": 50}))
    assert summary.samples_written == kept_after
    shards = shard_tables(run / "shards")
    assert not {u for t in shards.values() for u in t.column("uid").to_pylist()} & set(uid_url)
    assert verify_run(run).ok, verify_run(run).problems


def test_verify_flags_a_takedown_left_unfinished(run, tmp_path, monkeypatch):
    listed, _, _ = takedown_list(run, tmp_path)
    monkeypatch.setattr(maintenance, "take_down_shard", crash_on_call(maintenance.take_down_shard, 1))
    with pytest.raises(RuntimeError, match="killed"):
        takedown(run, listed)
    assert any("still in the shards" in p for p in verify_run(run).problems)  # with the lead's verify change


def crash_on_call(function, n: int):
    """``function``, except that its n-th call (0-based) dies before doing anything."""
    calls = Counter()

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] - 1 == n:
            raise RuntimeError("killed")
        return function(*args, **kwargs)

    return wrapper


def crash_between_renames(commit):
    """The first shard commit renames its tar, then dies before renaming its parquet."""
    calls = Counter()

    def wrapper(temps, finals):
        calls["n"] += 1
        if calls["n"] == 1:
            commit(temps[:1], finals[:1])
            raise RuntimeError("killed")
        return commit(temps, finals)

    return wrapper


@pytest.mark.parametrize("crash", ["between_shards", "between_renames"])
def test_takedown_killed_midway_leaves_shards_whole_and_a_rerun_completes_it(run, tmp_path, monkeypatch, crash):
    listed, _, where = takedown_list(run, tmp_path)
    first, second = sorted({w for w in where.values() if w})
    original = digests(run / "shards")
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    takedown(clean, listed)
    done_right = digests(clean / "shards")

    with monkeypatch.context() as patch:
        if crash == "between_shards":
            patch.setattr(maintenance, "take_down_shard", crash_on_call(maintenance.take_down_shard, 1))
        else:
            patch.setattr(maintenance, "_commit", crash_between_renames(maintenance._commit))
        with pytest.raises(RuntimeError, match="killed"):
            takedown(run, listed)

    assert not list(run.rglob("*.tmp"))
    state = digests(run / "shards")
    for name in original:
        if name.endswith((".tar", ".parquet")):  # no partial file under a final name: each is old or new
            assert state[name] in (original[name], done_right[name]), name
    pair = lambda digest, stem: (digest[f"{stem}.tar"], digest[f"{stem}.parquet"])  # noqa: E731
    one, two = first.split(".")[0], second.split(".")[0]
    if crash == "between_shards":  # the first shard is fully new, the second fully old
        assert pair(state, one) == pair(done_right, one) and pair(state, two) == pair(original, two)
    else:  # the one window a two-file shard has: its tar renamed, its parquet not yet; verify says so
        assert (state[f"{one}.tar"], state[f"{one}.parquet"]) == (done_right[f"{one}.tar"], original[f"{one}.parquet"])
        assert any(first in p and "differ" in p for p in verify_run(run).problems)
    assert not (run / "takedowns.jsonl").exists()  # the log records removals that finished

    summary = takedown(run, listed)

    assert summary.logged == 6 and summary.uids_added == 0
    for name, digest in digests(run / "shards").items():
        if not name.endswith(".done.json"):  # markers carry a fresh version id
            assert digest == done_right[name], name
    for name in (f"{one}.done.json", f"{two}.done.json"):
        got, want = (json.loads((r / "shards/_markers" / name).read_text()) for r in (run, clean))
        assert (got["kept"], got["dropped"]) == (want["kept"], want["dropped"])
    assert digests(run / "download") == digests(clean / "download")
    logged = [json.loads(line)["uid"] for line in (run / "takedowns.jsonl").read_text().splitlines()]
    assert sorted(logged) == sorted(where)


def test_takedown_refuses_an_unfinished_run(run, tmp_path):
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(meta | {"status": "running"}))
    with pytest.raises(UserError, match="not finished"):
        takedown(run, write_list(tmp_path / "urls.txt", "url", ["http://127.0.0.1/x.jpg"]))
    with pytest.raises(UserError, match="not a pairsift run directory"):
        takedown(tmp_path, write_list(tmp_path / "urls.txt", "url", ["http://127.0.0.1/x.jpg"]))
