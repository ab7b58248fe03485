"""Can W&B go online here? One answer for ``iresflow train`` and ``iresflow sweep``.

The server is ``$WANDB_BASE_URL`` (a self-hosted W&B) or ``https://api.wandb.ai``;
a key is ``$WANDB_API_KEY`` or a netrc entry for *that* host (what ``wandb login``
writes). Online needs both a key and a server that answers; nothing here waits
longer than a couple of seconds.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["MODES", "server", "api_key_available", "server_reachable", "resolve_mode"]

DEFAULT_URL = "https://api.wandb.ai"
MODES = ("auto", "online", "offline", "disabled")


def server() -> tuple[str, int]:
    """``(host, port)`` of the W&B server this environment talks to."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_URL)
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def api_key_available() -> bool:
    """A key in ``WANDB_API_KEY`` or a netrc entry for the server's host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host, _ = server()
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.is_file() and host in netrc.read_text()
    except OSError:
        return False


def server_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the server opens within ``timeout`` seconds."""
    try:
        with socket.create_connection(server(), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(requested: str = "auto") -> str:
    """``online`` / ``offline`` / ``disabled`` for a logger whose config asks ``requested``.

    ``auto``: ``$WANDB_MODE`` when set, else online only with a key and a reachable server.
    """
    if requested not in MODES:
        raise ValueError(f"logger.mode must be one of {', '.join(MODES)}, not {requested!r}")
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if api_key_available() and server_reachable() else "offline"
