"""Stages and process helpers for the multi-node, node-loss and crash-consistency tests.

``Render`` is a real Stage that gives every row a small PNG drawn from its uid (so the final shards
hold real images and their bytes are reproducible) and can sleep so a test can kill things mid-shard.
``Trace`` changes nothing but appends a line per shard saying which Ray node ran it (the
``PAIRSIFT_NODE`` label the test gave that node's ``ray start``, inherited by its workers).
``SlowShard`` sleeps on the one shard holding a given caption, to push it past the shard deadline.
The ``/proc`` helpers find the processes a test started (by temp dir and parent tree), and the Ray
workers currently running tasks or actors, so tests kill exactly those and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pairsift.stages.base import IMAGE, Contract, Stage, StageConfig

REPO = Path(__file__).resolve().parent.parent


class RenderConfig(StageConfig):
    sleep_s: float = 0.0


def draw_png(uid: str) -> bytes:
    """A 16x16 PNG whose colours come from the uid: different per row, identical on every run."""
    digest = hashlib.blake2b(uid.encode(), digest_size=6).digest()
    image = Image.new("RGB", (16, 16), tuple(digest[:3]))
    image.paste(tuple(digest[3:]), (4, 4, 12, 12))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class Render(Stage):
    """Adds ``image`` (PNG bytes) and ``image_bytes`` to every row; drops nothing."""

    name = "render"
    config_class = RenderConfig

    def contract(self) -> Contract:
        return Contract(writes={IMAGE: pa.binary(), "image_bytes": pa.int32()})

    def __call__(self, shard: pa.Table) -> pa.Table:
        time.sleep(self.cfg.sleep_s)
        images = [draw_png(uid) for uid in shard.column("uid").to_pylist()]
        out = shard.append_column(IMAGE, pa.array(images, pa.binary()))
        return out.append_column("image_bytes", pa.array([len(b) for b in images], pa.int32()))


def trace(trace_dir: str, **fields: object) -> None:
    """Append one line; O_APPEND writes this small are atomic, so workers on all nodes share one file."""
    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    line = json.dumps({"node": os.environ.get("PAIRSIFT_NODE", "local"),
                       "raylet_pid": os.environ.get("RAY_RAYLET_PID"), "pid": os.getpid(),
                       "time": time.time(), **fields}) + "\n"
    fd = os.open(Path(trace_dir) / "trace.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_trace(trace_dir: str | Path) -> list[dict]:
    path = Path(trace_dir) / "trace.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TraceConfig(StageConfig):
    trace_dir: str
    sleep_s: float = 0.0


class Trace(Stage):
    """Records where each shard ran (a ``start`` line, then an ``end`` line) and changes nothing:
    its output is the same wherever and however often it runs."""

    name = "trace"
    config_class = TraceConfig

    def __call__(self, shard: pa.Table) -> pa.Table:
        first = shard.column("uid")[0].as_py() if shard.num_rows else None
        trace(self.cfg.trace_dir, event="start", first_uid=first)
        time.sleep(self.cfg.sleep_s)
        trace(self.cfg.trace_dir, event="end", first_uid=first)
        return shard


class SlowShardConfig(StageConfig):
    slow_caption: str  # the shard holding a row with this caption sleeps slow_s
    slow_s: float = 60.0


class SlowShard(Stage):
    """A straggler: one shard never finishes in time; every other shard passes straight through."""

    name = "slow_shard"
    config_class = SlowShardConfig

    def contract(self) -> Contract:
        return Contract(reads=("caption",))

    def __call__(self, shard: pa.Table) -> pa.Table:
        if self.cfg.slow_caption in shard.column("caption").to_pylist():
            time.sleep(self.cfg.slow_s)
        return shard


class SlowShardActor(SlowShard):
    """The same straggler in an actor pool (stateful stages are retried by replacing the actor)."""

    name = "slow_shard_actor"
    stateful = True


CLUSTER_STAGES = {
    "render": "cluster_stages:Render",
    "trace": "cluster_stages:Trace",
    "slow_shard": "cluster_stages:SlowShard",
    "slow_shard_actor": "cluster_stages:SlowShardActor",
}


# --- processes ---------------------------------------------------------------------------------

def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line) for every process we can read."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        table[int(name)] = (int(fields[1]), fields[0], cmdline)
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, str, str]]) -> set[int]:
    """``roots`` and every process below them (zombies included: they still hold a pid)."""
    found = set(roots) & set(table)
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def matching(marker: str, table: dict[int, tuple[int, str, str]] | None = None) -> set[int]:
    """Processes whose command line names ``marker`` (a Ray temp dir), plus their descendants."""
    table = table if table is not None else process_table()
    me = os.getpid()
    return descendants({pid for pid, (_, _, cmd) in table.items() if marker in cmd and pid != me}, table)


def living(pids: set[int]) -> set[int]:
    """The pids that still run (a zombie has exited: only its parent's reaping is left)."""
    table = process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def kill_all(pids: set[int], grace_s: float = 3.0, crash: bool = False) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL whatever is left, as ``ray stop`` does, by id;
    ``crash`` sends SIGKILL straight away (a machine lost, not stopped). Returns once all are gone
    or the last grace period ran out."""
    for sig in (signal.SIGKILL,) if crash else (signal.SIGTERM, signal.SIGKILL):
        for pid in living(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while living(pids) and time.monotonic() < deadline:
            time.sleep(0.05)


def our_raylet() -> int:
    """The raylet of the Ray this process started (``ray_local``): a descendant of this process."""
    table = process_table()
    mine = descendants({os.getpid()}, table)
    raylets = [pid for pid in mine if "/raylet/raylet " in table[pid][2] + " " and table[pid][1] != "Z"]
    if len(raylets) != 1:
        raise RuntimeError(f"expected one raylet below pid {os.getpid()}, found {raylets}")
    return raylets[0]


BUSY_TITLES = ("ray::_call_worker", "ray::_Actor")  # the executor's task function and actor class


def busy_workers(raylet: int) -> list[int]:
    """Worker processes of ``raylet`` that hold one of our tasks or actors right now."""
    table = process_table()
    return sorted(pid for pid, (ppid, state, cmd) in table.items()
                  if ppid == raylet and state != "Z" and cmd.startswith(BUSY_TITLES))


# --- chaos: kill workers and drivers, then compare with an uninterrupted run -------------------

class WorkerKiller:
    """A thread that SIGKILLs a random busy Ray worker (task or actor) every few tenths of a second,
    at most ``budget`` times: with ``budget`` <= the executor's retries no shard can run out of
    attempts, so every kill must be survived within the same run."""

    def __init__(self, raylet: int, rng: random.Random, budget: int, gap_s: tuple[float, float] = (0.2, 0.8)):
        self.raylet = raylet
        self.rng = rng
        self.budget = budget
        self.gap_s = gap_s
        self.killed: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-killer", daemon=True)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while len(self.killed) < self.budget and not self._stop.wait(self.rng.uniform(*self.gap_s)):
            table = process_table()
            busy = busy_workers(self.raylet)
            if not busy:
                continue
            pid = self.rng.choice(busy)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append((pid, table.get(pid, (0, "", "?"))[2]))


DRIVER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pairsift.stages import STAGES
from toy_stages import TOY_STAGES
from cluster_stages import CLUSTER_STAGES
STAGES.update(TOY_STAGES)
STAGES.update(CLUSTER_STAGES)
from pairsift.pipeline.cli import main
main()
"""


def cli_argv(*args: str) -> list[str]:
    """``pairsift ARGS`` in a new interpreter that also knows the test stages (the real CLI's main)."""
    return [sys.executable, "-c", DRIVER.format(repo=str(REPO), tests=str(REPO / "tests")), *args]


def finished_markers(run_root: Path) -> int:
    """Pieces of work finished after ingest (stage parts, partials, output shards)."""
    return sum(1 for p in run_root.rglob("*.done.json") if p.parent.parent.name != "ingest")


def run_until_killed(argv: list[str], run_root: Path, after_markers: int, log: Path,
                     timeout_s: float = 120) -> bool:
    """Start a driver; SIGKILL it once ``after_markers`` pieces of work are done. False when it
    finished first (nothing to kill)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if finished_markers(run_root) >= after_markers:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        if proc.poll() is None:
            raise TimeoutError(f"driver still running after {timeout_s}s; see {log}")
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until_idle(raylet: int, timeout_s: float = 20) -> None:
    """Ray ends a dead driver's workers by itself: wait for that, so no old worker writes into the rerun."""
    deadline = time.monotonic() + timeout_s
    while busy_workers(raylet) and time.monotonic() < deadline:
        time.sleep(0.1)


def temp_files(run_root: Path) -> list[Path]:
    return sorted(run_root.rglob("*.tmp"))


def catalog(run_root: Path) -> tuple[list[str], list[tuple]]:
    from pairsift.pipeline.catalog import query

    return query(run_root, "SELECT * FROM samples ORDER BY uid")


def _visible(folder: Path, pattern: str) -> dict[str, Path]:
    """Files a reader of the run sees: no markers, no hidden temporaries (``temp_files`` checks those)."""
    return {p.name: p for p in folder.glob(pattern)
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".done.json", ".failed.json"))}


def differences(run_root: Path, reference: Path, image_stages: tuple[str, ...] = ()) -> list[str]:
    """Everything a user reads from a run, compared: the catalog, the final shards (tar bytes,
    parquet rows, sizes.json) and each image-storing stage's tars. Empty when equal."""
    import pyarrow.parquet as pq

    found = []
    if catalog(run_root) != catalog(reference):
        found.append("the samples catalog differs")
    for folder, pattern in [("shards", "*"), ("shards/_meta", "*")] + [(label, "*.tar") for label in image_stages]:
        ours, theirs = _visible(run_root / folder, pattern), _visible(reference / folder, pattern)
        if sorted(ours) != sorted(theirs):
            found.append(f"{folder}: files differ: {sorted(set(ours) ^ set(theirs))[:5]}")
            continue
        for name, path in sorted(ours.items()):
            if name.endswith(".parquet"):
                if not pq.read_table(path).equals(pq.read_table(theirs[name])):
                    found.append(f"{folder}/{name}: rows differ")
            elif path.read_bytes() != theirs[name].read_bytes():
                found.append(f"{folder}/{name}: bytes differ")
    return found


def duplicated_samples(run_root: Path) -> int:
    """Rows that appear more than once in the catalog plus samples that appear in two shards."""
    from pairsift.pipeline.catalog import query

    _, rows = query(run_root, "SELECT count(*) - count(DISTINCT uid) FROM samples")
    keys: list[str] = []
    for tar_path in sorted((run_root / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += sorted({m.name.rsplit(".", 1)[0] for m in tar})
    return int(rows[0][0]) + len(keys) - len(set(keys))
