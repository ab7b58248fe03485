"""The sweep's child processes: each leads its own process group and dies with the sweep.

- A child starts in a new session, so a terminal's Ctrl-C reaches only the sweep, which
  forwards it; the child's process group holds everything it starts (DDP ranks, data workers),
  so the sweep can end all of it.
- On Linux the child asks the kernel for SIGTERM when the sweep dies (``PR_SET_PDEATHSIG``):
  a SIGKILLed sweep still stops its runs, which checkpoint and exit as if preempted.
- :class:`StopSignals` catches SIGTERM, SIGINT and SIGHUP while children are live, so the
  sweep can stop them in order instead of dying first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Callable, Sequence

__all__ = ["spawn", "send", "signal_group", "group_members", "StopSignals"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # resolved here: the forked child only calls it
        prctl, set_handler = libc.prctl, libc.signal
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Until exec, the child still has this Python's handler for SIGTERM, which would only
        # note the signal: take the default action so the death signal can end it right away.
        set_handler(int(signal.SIGTERM), 0)  # SIG_DFL
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before the request was in place
            os._exit(1)

    return preexec


def spawn(command: Sequence[str], *, env: dict[str, str], log: IO | None = None) -> subprocess.Popen:
    """Start ``command`` as the leader of a new process group; its output goes to ``log``
    (stdout and stderr together) or, without one, to the sweep's own."""
    return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent())


def send(proc: subprocess.Popen, sig: int) -> None:
    """Signal the leader only (it stops its own workers); nothing once it has been reaped."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def signal_group(pgid: int, sig: int) -> None:
    """Signal every process of a group (nothing when none is left)."""
    if pgid <= 1:  # 0 would be this process's own group, 1 init's
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """The live processes of group ``pgid`` (zombies, exited but not reaped, excluded)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # fields after the command name: state ppid pgrp ...
            state, _, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class StopSignals:
    """While entered, SIGTERM, SIGINT and SIGHUP are noted in :attr:`received` (in order)
    instead of ending this process; the previous handlers come back on exit. Only the main
    thread can hold signal handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
