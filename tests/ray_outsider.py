"""What an outsider on this machine can do to a Ray or a training run: dial it, and list what listens.

An outsider dials through 127.0.0.3, an address nobody configured (never 127.0.0.1: Ray rewrites that
to the machine's network address). Shared by the pipeline's and the trainer's security tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from cluster_stages import descendants, process_table

OUTSIDER = "127.0.0.3"
KV_NAMESPACE = "pairsift_security_test"
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}
WRONG_TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
EVERY_INTERFACE = ("*", "0.0.0.0", "::")

# Read the internal KV through the GCS client, or join as a driver and run a task.
READ_KV = """
import sys
from ray._raylet import GcsClient
print("VALUE", GcsClient(address=sys.argv[1]).internal_kv_get(b"probe", sys.argv[2].encode(), timeout=10))
"""
JOIN = """
import os, sys, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.2", logging_level="ERROR")
print("VALUE", ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote()))
"""


def with_token() -> dict[str, str]:
    """The auth this process's Ray runs with: what an insider holds."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}


def outsider(script: str, gcs_port: int, auth: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``script`` as another process of this machine, with ``auth`` and none of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | auth
    return subprocess.run([sys.executable, "-c", script, f"{OUTSIDER}:{gcs_port}", KV_NAMESPACE],
                          env=env, capture_output=True, text=True, timeout=120)


def current_gcs_port() -> int:
    import ray

    return int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])


def listeners(include_self: bool = False) -> set[tuple[str, int, str, int]]:
    """(process name, pid, address, port) of every TCP socket listening in this process's children
    (and this process), from ``ss -ltnp``; address ``*`` is every interface, IPv4 and IPv6."""
    mine = descendants({os.getpid()}, process_table())
    if not include_self:
        mine.discard(os.getpid())
    rows = set()
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
        local = line.split()[3]
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in mine:
                ip, port = local.rsplit(":", 1)
                rows.add((name, int(pid), ip.strip("[]"), int(port)))
    return rows
