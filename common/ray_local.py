"""Start (or join) Ray the one way pairsift does: a local Ray on loopback, usable only with this run's token.

A local Ray's GCS, raylet, object manager, core workers and agents listen on every interface
whatever address it is given (``_node_ip_address`` only sets the address it advertises), so the
only thing between another process and code execution on the workers is token authentication.
Ray reads ``RAY_AUTH_MODE`` when it is imported, and a mode set after the import makes the GCS
fail to start: the mode and the token are exported here, before the first ``import ray``, and
Ray's cached copy is refreshed if something imported it earlier. Workers inherit the driver's
environment, token included; nothing secret passes through Ray's tables.

The pipeline's executor and the trainer's ``launcher: ray`` both start Ray through this module.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from typing import Any

LOCAL_NODE_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's network address; other loopbacks stay
AUTH_MODES = ("token", "disabled")


class RayAuthError(ValueError):
    """The requested auth mode contradicts the environment, or would leave a local Ray open."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (bind to port 0, read it back, release it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _exported_mode() -> str | None:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode not in AUTH_MODES:
        raise RayAuthError(f"RAY_AUTH_MODE={mode!r} is exported: expected one of {', '.join(AUTH_MODES)}")
    return mode


def _check_agrees(requested: str | None, exported: str | None) -> None:
    """The user's exported mode is never overridden silently: a config that disagrees is an error."""
    if requested and exported and requested != exported:
        raise RayAuthError(f"ray.auth_mode is {requested!r} but RAY_AUTH_MODE={exported!r} is exported: "
                           "make them agree (or unset RAY_AUTH_MODE)")


def prepare_local_auth(requested: str | None) -> str:
    """Export the auth mode for a Ray this process starts: token (a fresh random one unless the user
    exported theirs) unless the config explicitly opts out with ``disabled``. Returns the mode."""
    exported = _exported_mode()
    _check_agrees(requested, exported)
    mode = requested or exported or "token"
    if mode == "disabled" and requested != "disabled":
        raise RayAuthError("RAY_AUTH_MODE=disabled would start a local Ray anyone on this machine can run code "
                           "on; set ray.auth_mode: disabled in the config to opt out explicitly")
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token" and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    if mode == "disabled":
        print("warning: ray.auth_mode is disabled: any local process can reach this Ray and run code on it",
              file=sys.stderr)
    _refresh_imported_ray()
    return mode


def prepare_join_auth(requested: str | None) -> None:
    """For joining a cluster: the user's exported RAY_AUTH_MODE/RAY_AUTH_TOKEN are used as they are;
    a mode from the config is exported only where the user set none."""
    exported = _exported_mode()
    _check_agrees(requested, exported)
    if requested and not exported:
        os.environ["RAY_AUTH_MODE"] = requested
        _refresh_imported_ray()


def _refresh_imported_ray() -> None:
    """Ray caches its config (auth mode included) at import: make an earlier import see the new mode."""
    if "ray" not in sys.modules:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def start_ray(address: str | None, auth_mode: str | None, node_ip: str = LOCAL_NODE_IP,
              **local_kwargs: Any) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a token-protected Ray on ``node_ip``.

    ``ray job submit`` runs its entrypoint with ``RAY_ADDRESS`` set: a command submitted as a job
    joins that cluster rather than starting a Ray of its own. ``local_kwargs`` go to ``ray.init``
    for a local start only (``num_cpus``, logging)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return  # already up (a test session, a caller's own ray.init): its auth is settled
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        prepare_join_auth(auth_mode)
    else:
        prepare_local_auth(auth_mode)
    import ray

    if address:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    else:
        ray.init(_node_ip_address=node_ip, include_dashboard=False, **local_kwargs)
