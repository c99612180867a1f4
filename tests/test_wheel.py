"""The wheel, as a user gets it: built, installed into a fresh venv, run from an empty directory.

Nothing generic lands in site-packages (only ``pairsift/...``), the presets, model configs, report
template and prompts travel as package data, and ``pairsift validate demo`` and a small real run of the
demo preset work outside the checkout. The venv reuses this interpreter's installed packages through a
``.pth`` file (no download); the wheel itself is installed without dependencies.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "common", "pipeline", "stages", "trainer", "configs")
pytestmark = pytest.mark.slow

# the demo's spine only: the CLIP stages and balancing need the filter network `pairsift demo` trains
SPINE = ("stages=[{stage: text_filter, min_words: 2, languages: [en]},"
         " {stage: download, image_size: 64, timeout_s: 5, deadline_s: 10, allow_loopback: true},"
         " {stage: image_filter, min_side: 24}]")


def clean_env() -> dict[str, str]:
    """This environment without what points at the checkout (tests/conftest.py puts it on PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "NO_ALBUMENTATIONS_UPDATE": "1"}


def sh(*cmd: str | Path, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {(proc.stderr or proc.stdout)[-3000:]}"
    return proc


def _setuptools_builds_wheels() -> bool:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(x) for x in version.split(".")[:2]) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the wheel is made of: a build in the checkout leaves build/ behind,
    # whose stale files a later build would ship
    source = tmp_path_factory.mktemp("source")
    for part in SOURCES:
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / part, source / part)
    # this environment's setuptools builds it when it can write wheels itself (>= 70.1); otherwise pip
    # makes an isolated build env from the package index, as for any user
    isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
    sh(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", *isolation, "-w", out, cwd=source)
    (found,) = out.glob("pairsift-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; every other package is this interpreter's."""
    root = tmp_path_factory.mktemp("venv") / "v"
    sh(sys.executable, "-m", "venv", root, cwd=root.parent)
    site = Path(sh(root / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                   cwd=root).stdout.strip())
    # installed first: with this env's packages visible, pip would take the checkout's editable
    # pairsift for the same version and install nothing
    sh(root / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=root)
    ours = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))}
    # plain path lines: the editable installs in those dirs (their own .pth files) stay inactive
    (site / "_base_env.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return root


def test_the_wheel_installs_one_namespace_with_its_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pairsift", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for data in ("pairsift/configs/demo.yaml", "pairsift/configs/models/tiny-vit.json",
                 "pairsift/configs/train/tiny.yaml", "pairsift/pipeline/report_template.html",
                 "pairsift/stages/prompts/laclip_examples.txt"):
        assert data in names, data
    shipped = {n.removeprefix("pairsift/") for n in names if n.startswith("pairsift/")}
    for pattern in ("configs/*.yaml", "configs/models/*.json", "pipeline/*.json", "pipeline/*.html", "stages/prompts/*"):
        files = {str(p.relative_to(REPO)) for p in REPO.glob(pattern)}
        assert files <= shipped, files - shipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port}")


def test_validate_and_a_demo_run_from_an_empty_directory(venv, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = clean_env()
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    pairsift = venv / "bin" / "pairsift"
    where = sh(venv / "bin" / "python", "-c", "import pairsift.pipeline as p; print(p.__file__)", cwd=work, env=env)
    assert where.stdout.startswith(str(venv))  # the wheel's copy, not a checkout's

    # the demo preset's relative paths, filled the way `pairsift demo` fills them
    port = free_port()
    corpus = work / "runs" / "demo" / "corpus"
    sh(pairsift, "synth", "--out", corpus, "--n", "200", "--seed", "0", "--base-url", f"http://127.0.0.1:{port}",
       cwd=work, env=env)
    (corpus / "metadata.txt").write_text("red circle\nblue square\n")
    validated = sh(pairsift, "validate", "demo", cwd=work, env=env)
    assert validated.stdout.startswith("ok: 6 stages: text_filter, download, image_filter, clip_score")

    server = subprocess.Popen([str(pairsift), "serve", str(corpus), "--port", str(port)], cwd=work, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(port, server)
        sh(pairsift, "run", "demo", "--executor", "local", "--set", "input.shard_size=100", "--set", SPINE,
           cwd=work, env=env, timeout=600)
    finally:
        server.terminate()
        server.wait(timeout=30)
    run = work / "runs" / "demo" / "run"
    kept = json.loads(sh(pairsift, "query", run, "SELECT count(*) AS n FROM samples WHERE reason IS NULL",
                         "--format", "json", cwd=work, env=env).stdout)[0]["n"]
    images = 0
    for tar in sorted((run / "shards").glob("*.tar")):
        with tarfile.open(tar) as archive:
            images += sum(name.endswith(".jpg") for name in archive.getnames())
    assert kept > 100 and images == kept  # most of 200 pairs survive; every kept pair is in a shard
