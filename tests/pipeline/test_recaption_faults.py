"""Inference faults in recaptioning: the engine's process dies mid-batch; an output runs past max_tokens.

The rewrite stage talks to a fake ``vllm serve`` (tests/vllm_cpu/fake_openai.py, a real HTTP server on
127.0.0.1) from a Ray actor. The server holds one request of one shard open until the test has
SIGKILLed the very process that sent it (found from the connection's socket in /proc), so the
actor dies with part of its shard answered and part not. The executor must replace the actor and
run that shard again, once; the server's request log then shows every prompt of that shard at most
twice, every other prompt once, and the run holds exactly the rewrites an uninterrupted run makes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from cluster_stages import duplicated_samples, process_table

from pairsift.pipeline.catalog import query
from pairsift.pipeline.config import parse_config
from pairsift.pipeline.run_dir import RunDir
from pairsift.pipeline.runner import run_pipeline
from pairsift.pipeline.verify import verify_run
from pairsift.stages.caption_checks import parse_completion, sanitize, validate_rewrite
from pairsift.stages.engines import EngineConfig
from pairsift.stages.rewrite import Rewrite, RewriteConfig

HELPERS = Path(__file__).resolve().parents[1] / "vllm_cpu"
ROWS, SHARD_ROWS, K = 48, 12, 2
TRAP = "item017"  # the caption whose first prompt the server holds until its sender is killed
CAPTION = re.compile(r'"([^"]*)" => "$')


def fake_openai():
    """tests/vllm_cpu/fake_openai.py by path (a ``tests/vllm`` package would shadow the real vllm)."""
    name = "pairsift_test_fake_openai"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HELPERS / "fake_openai.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def caption_in(prompt: str) -> str:
    """The caption a rewrite prompt asks about: its last line is ``"<caption>" => "``."""
    return CAPTION.findall(prompt)[0]


def rewrite_reply(body: dict) -> str:
    """A deterministic LLM: a rewrite of the quoted caption, or chatter (rejected, redrawn) for
    one seed in five; the answer depends on the request alone, as a seeded model's does."""
    caption = caption_in(body["prompt"])
    if body["seed"] % 5 == 0:
        return 'Sure! Here is your rewritten caption: "a photo"'
    words = ["photo", "picture", "snapshot", "image", "shot", "view", "scene"]
    return f'a {words[body["seed"] % 7]} showing {caption}"\n"more" => "'


def client_pid(client_port: int, server_port: int) -> int | None:
    """The process holding the loopback connection 127.0.0.1:client_port -> 127.0.0.1:server_port."""
    local, remote = f"0100007F:{client_port:04X}", f"0100007F:{server_port:04X}"
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return int(pid)
            except OSError:
                continue
    return None


@dataclass(frozen=True)
class Seen:
    caption: str
    seed: int  # with the caption, names one prompt: (uid, slot, attempt)
    pid: int | None  # the process that sent it
    after_kill: bool

    @property
    def key(self) -> tuple[str, int]:
        return self.caption, self.seed


class TrappingServe:
    """Builds a FakeVllmServe that logs who sent each request and springs the trap once."""

    @staticmethod
    def make(trap: str | None):
        base = fake_openai().FakeVllmServe

        class Trapping(base):
            def __init__(self) -> None:
                self.trap = trap
                self.seen: list[Seen] = []
                self.caught = threading.Event()  # the trapped request is being held
                self.killed = threading.Event()  # its sender is dead
                self.released = threading.Event()  # let the held request answer (to nobody)
                self.trapped_pid: int | None = None
                self._client = threading.local()
                self._pids: dict[int, int | None] = {}
                super().__init__(rewrite_reply)

            def _handler(self):
                handler, fake = super()._handler(), self

                class Recording(handler):
                    def do_POST(self) -> None:
                        fake._client.port = self.client_address[1]
                        super().do_POST()

                return Recording

            def _pid(self) -> int | None:
                port = self._client.port
                if port not in self._pids:  # keep-alive: one lookup per connection
                    self._pids[port] = client_pid(port, self.server.server_address[1])
                return self._pids[port]

            def _respond(self, path, body):
                caption = caption_in(fake_openai().prompt_text(body))
                pid = self._pid()
                with self._lock:
                    self.seen.append(Seen(caption, body["seed"], pid, self.killed.is_set()))
                    spring = self.trap is not None and self.trap in caption and not self.caught.is_set()
                    if spring:
                        self.trapped_pid = pid
                        self.caught.set()
                if spring:
                    self.released.wait(60)
                    return 503, {"error": "the client is gone"}
                return super()._respond(path, body)

        return Trapping()


def kill_trapped_sender(server, out: dict) -> None:
    """Wait for the trap, SIGKILL the process holding that connection, wait until it is gone."""
    try:
        if not server.caught.wait(120):
            return
        pid = server.trapped_pid
        if pid is None:
            return
        out["cmdline"] = process_table().get(pid, (0, "", ""))[2]
        os.kill(pid, signal.SIGKILL)
        out["pid"] = pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = process_table().get(pid)
            if state is None or state[1] == "Z":
                out["gone"] = True
                break
            time.sleep(0.02)
        server.killed.set()
    finally:
        server.released.set()


def make_pool(path: Path) -> None:
    """Every fourth caption is too short for caption_length's min_chars and never reaches rewrite."""
    rows = []
    for i in range(ROWS):
        caption = f"icon {i}" if i % 4 == 3 else f"a wooden chair item{i:03d} in a bright room"
        rows.append({"url": f"http://127.0.0.1:1/img/{i}.jpg", "caption": caption})
    pq.write_table(pa.Table.from_pylist(rows), path)


def rewrite_config(base_url: str) -> dict:
    engine = {"backend": "openai", "model": "tiny", "base_url": base_url, "concurrency": 2}
    return {"engine": engine, "k": K, "batch_size": 8}  # several engine calls per shard


def shard_samples(run_root: Path) -> dict[str, dict]:
    """uid -> the json of each sample in the final shards."""
    samples: dict[str, dict] = {}
    for tar_path in sorted((run_root / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    assert meta["uid"] not in samples
                    samples[meta["uid"]] = meta
    return samples


def test_engine_process_killed_mid_batch_is_replaced_and_its_shard_retried_once(ray_local, registry, tmp_path):
    make_pool(tmp_path / "pool.parquet")
    killed: dict = {}
    with TrappingServe.make(TRAP) as server:
        cfg = parse_config({
            "run_dir": str(tmp_path / "run"),
            "input": {"path": str(tmp_path / "pool.parquet"), "shard_size": SHARD_ROWS},
            # one retry allowed: the run can only finish if the killed shard's retry succeeds
            "executor": {"kind": "ray", "max_retries": 1, "shard_timeout_s": 120},
            "stages": [
                {"stage": "render"},
                {"stage": "caption_length", "min_chars": 20},
                {"stage": "rewrite", **rewrite_config(server.url)},
            ],
            "shards": {"samples_per_shard": 16},
        })
        killer = threading.Thread(target=kill_trapped_sender, args=(server, killed), daemon=True)
        killer.start()
        summary = run_pipeline(cfg)
        killer.join(timeout=5)
    run_root = tmp_path / "run"

    # the run finished whole
    assert summary.failed == {}
    assert json.loads((run_root / "run.json").read_text())["status"] == "finished"
    report = verify_run(run_root)
    assert report.ok, report.problems

    # the engine's process was a Ray actor of ours, and it died mid-shard
    assert killed.get("gone"), f"the trap never caught a live sender: {killed}"
    assert killed["cmdline"].startswith("ray::_Actor"), killed["cmdline"]
    dead = killed["pid"]

    # which prompts belong to the interrupted shard
    _, rows = query(run_root, "SELECT uid, caption, caption_length_reason FROM samples ORDER BY uid")
    kept = {uid: caption for uid, caption, reason in rows if reason is None}
    shard_of = {}
    for part in sorted((run_root / "ingest").glob("part-*.parquet")):
        for uid in pq.read_table(part).column("uid").to_pylist():
            shard_of[uid] = int(part.name[5:10])
    uid_of = {caption: uid for uid, caption in kept.items()}
    interrupted = shard_of[next(uid for caption, uid in uid_of.items() if TRAP in caption)]
    # the marker of the interrupted shard says it took two attempts, and why; the others took one
    run = RunDir(run_root)
    markers = {shard: run.read_done(run.part("rewrite", shard)) for shard in set(shard_of.values())}
    assert {s: m.attempts for s, m in markers.items()} == {s: 2 if s == interrupted else 1 for s in markers}
    assert any(e.startswith("attempt failed:") for e in markers[interrupted].errors), markers[interrupted].errors

    # an uninterrupted run of the same stage on the same rows, against a fresh server
    with TrappingServe.make(None) as reference_server:
        stage = Rewrite(RewriteConfig(**rewrite_config(reference_server.url)))
        uids = sorted(kept)
        expected = stage(pa.table({"uid": uids, "caption": [kept[u] for u in uids]}))
        stage.engine.close()
    expected_rewrites = dict(zip(uids, expected.column("rewrites").to_pylist()))
    reference_keys = Counter(s.key for s in reference_server.seen)
    assert set(reference_keys.values()) == {1} and len(reference_keys) > K * len(kept)  # some redrawn

    # the server's view: nothing lost, the interrupted shard asked at most twice, the rest once
    counts = Counter(s.key for s in server.seen)
    assert set(counts) == set(reference_keys)
    in_interrupted = {key for key in counts if shard_of[uid_of[key[0]]] == interrupted}
    trapped = next(s.key for s in server.seen if TRAP in s.caption)
    assert counts[trapped] == 2
    assert {counts[key] for key in in_interrupted} <= {1, 2}
    assert sum(counts[key] == 2 for key in in_interrupted) >= 3  # answered before the kill, asked again
    assert {counts[key] for key in set(counts) - in_interrupted} == {1}

    # the repeats came from a new process: the killed one never spoke again, a replacement did.
    # (A request the dead actor had in flight — the engine sends 2 at once — may be read after its
    # death, with no process left to name: at most that many, all from the interrupted shard.)
    unnamed = [s for s in server.seen if s.pid is None]
    assert len(unnamed) <= 2 and all(s.key in in_interrupted for s in unnamed), unnamed
    first_seen: dict[tuple[str, int], Seen] = {}
    for seen in server.seen:
        if seen.key in first_seen:
            first = first_seen[seen.key]
            assert first.pid in (dead, None) and seen.pid not in (dead, None), (first, seen)
        first_seen.setdefault(seen.key, seen)
    # Requests read after the kill from the dead actor were in flight when it died (the server may
    # still name a process that is not reaped yet): at most the engine's 2 at once, all from the
    # interrupted shard; every one of them was asked again by a replacement (checked above).
    in_flight = [s for s in server.seen if s.after_kill and s.pid in (dead, None)]
    assert len(in_flight) <= 2 and all(s.key in in_interrupted for s in in_flight), in_flight
    before_kill = {s.pid for s in server.seen if not s.after_kill}
    replacements = {s.pid for s in server.seen if s.after_kill} - before_kill - {None}
    assert replacements, "no replacement actor ran"
    print(f"shard {interrupted}: {len(in_interrupted)} prompts, {sum(counts[k] == 2 for k in in_interrupted)} "
          f"asked twice; actor pid {dead} killed, replaced by {sorted(replacements)}; {len(counts)} prompts in all")

    # exactly one set of rewrites per kept row, in the catalog and in the training shards
    _, catalog_rows = query(run_root, "SELECT uid, rewrites FROM rewrite")
    assert len(catalog_rows) == len({uid for uid, _ in catalog_rows}) == len(kept)
    assert {uid: list(r) for uid, r in catalog_rows} == expected_rewrites
    samples = shard_samples(run_root)
    assert duplicated_samples(run_root) == 0
    assert set(samples) == set(kept)
    assert {uid: meta["rewrites"] for uid, meta in samples.items()} == expected_rewrites
    assert sum(map(len, expected_rewrites.values())) >= K * len(kept) * 0.9


# ------------------------------------------------------------------------------ outputs cut by max_tokens


def runaway_reply(body: dict) -> str:
    """One seed in three: a fluent text that never closes its quote and runs past max_tokens
    (words, in the fake server); its first max_tokens words would pass every other check."""
    caption = caption_in(body["prompt"])
    if body["seed"] % 3 == 0:
        return (f"a photo showing {caption} while the light of a slow summer evening falls across the "
                "old wooden floor and the open window of the quiet house by the river")
    words = ["photo", "picture", "snapshot", "image", "shot", "view", "scene"]
    return f'a {words[body["seed"] % 7]} showing {caption}"'


def test_rewrite_cut_at_max_tokens_is_flagged_truncated_and_redrawn():
    fake = fake_openai()
    max_tokens = 16
    with fake.FakeVllmServe(runaway_reply) as server:
        engine = EngineConfig(backend="openai", model="tiny", base_url=server.url, concurrency=4)
        stage = Rewrite(RewriteConfig(engine=engine, k=3, max_tokens=max_tokens))
        captions = [f"vintage bicycle number {i} for sale" for i in range(20)]
        table = pa.table({"uid": [f"{i:032x}" for i in range(20)], "caption": captions})
        out = stage(table)
        stage.engine.close()
    rewrites, flags = out.column("rewrites").to_pylist(), out.column("rewrite_flags").to_pylist()

    cut = [b for b in server.requests if b["seed"] % 3 == 0]  # each came back with finish_reason "length"
    assert cut and all(b["max_tokens"] == max_tokens for b in server.requests)
    # the cut text alone would have passed: only the finish reason rejects it
    for body in cut:
        caption = caption_in(body["prompt"])
        text = parse_completion(" ".join(runaway_reply(body).split()[:max_tokens]))
        assert validate_rewrite(text, sanitize(caption, 300), stage.guard, stage.bounds) is None
    assert sum(f.count("truncated") for f in flags) == len(cut)
    assert {flag for f in flags for flag in f} <= {"truncated", "duplicate"}  # two slots drew the same word
    # every rejected slot was asked again once with a fresh draw, validated on its own, and
    # dropped if that failed too: one request per slot plus one per first-try rejection
    first_try_rejections = sum(len(f) - (3 - len(r)) for r, f in zip(rewrites, flags))
    assert len(server.requests) == 20 * 3 + first_try_rejections
    for caption, row in zip(captions, rewrites):
        assert all(r.endswith(f"showing {caption}") for r in row)  # never a cut text
    assert sum(map(len, rewrites)) > 20 * 3 * 0.8
