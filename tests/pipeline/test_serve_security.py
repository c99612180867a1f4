"""`pairsift serve` hands out its corpus's `web/` folder and nothing else, and refuses the network in one line."""

from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path

import pytest

from pairsift.pipeline.serve import serve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A corpus whose web/ holds a file, a symlink to it, and symlinks leading out of the corpus."""
    web = tmp_path / "corpus" / "web"
    (web / "img").mkdir(parents=True)
    (web / "img" / "a.jpg").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_text("outside the corpus")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key.txt").write_text("outside too")
    (web / "img" / "alias.jpg").symlink_to(web / "img" / "a.jpg")
    (web / "img" / "leak.jpg").symlink_to(tmp_path / "secret.txt")
    (web / "outdir").symlink_to(tmp_path / "private", target_is_directory=True)
    return tmp_path / "corpus"


def get(server, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_symlinks_out_of_the_corpus_are_not_followed(corpus: Path) -> None:
    with serve(corpus, host="127.0.0.1") as server:
        assert get(server, "/img/a.jpg") == (200, b"inside")
        assert get(server, "/img/alias.jpg") == (200, b"inside")  # a link that stays inside is fine
        for path in ("/img/leak.jpg", "/outdir/key.txt"):
            status, body = get(server, path)
            assert status == 404 and b"outside" not in body, path


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_the_cli_refuses_a_non_loopback_host_in_one_line(corpus: Path, host: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pairsift.pipeline", "serve", str(corpus), "--host", host],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: refusing to serve on {host!r}: only loopback addresses (127.0.0.0/8, ::1) are allowed"]
