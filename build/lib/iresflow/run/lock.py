"""The run folder's lock: one owner (one process group, through its rank 0) at a time.

``<run>/.lock`` holds the owner's host, pid, the pid's start time and when it took the
lock. It is created atomically: the content is written to a private file first, then
hard-linked to ``.lock`` (``link`` fails when ``.lock`` exists, on local disks and NFS
alike), so no reader ever sees a half-written lock.

A lock whose owner is gone is *stale*: same host, and the pid is not running (or runs
another program: its start time differs). A stale lock is taken over by whoever first
creates ``.lock.takeover`` (again with ``link``); that one alone removes the stale lock
and takes its own, so of several processes racing for a stale lock exactly one wins and
the others see a live owner. A lock held on another host cannot be checked from here:
it is reported as busy, with what to delete if that job is known to be gone -- except when
its owner was this very SLURM job before it was requeued (the same job id, a lower
``SLURM_RESTART_COUNT``): SLURM ends a job before requeueing it, so that owner is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from iresflow.run.errors import RunFolderBusy

__all__ = ["LOCK_NAME", "Owner", "RunLock", "slurm_job_id"]

LOCK_NAME = ".lock"
TAKEOVER_NAME = ".lock.takeover"


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, from /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def slurm_job_id() -> str | None:
    """This process's SLURM job (an array task is ``<array job>_<task>``), None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _slurm_restart() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_start: str | None
    started: str
    token: str
    slurm_job: str | None = None   # the SLURM job (array task) and how often it had been requeued
    slurm_restart: int = 0

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()),
                   datetime.now().astimezone().isoformat(timespec="seconds"), uuid.uuid4().hex,
                   slurm_job_id(), _slurm_restart())

    def alive(self) -> bool:
        """False only when it is certain the owner is gone: same host and the pid is not that process,
        or an earlier run of this very SLURM job (requeued since: SLURM ends a job before it requeues it,
        and the requeued one may land on another node)."""
        job = slurm_job_id()
        if job is not None and self.slurm_job == job and _slurm_restart() > self.slurm_restart:
            return False
        if self.host != socket.gethostname():
            return True
        if not _running(self.pid):
            return False
        start = _process_start(self.pid)
        return self.pid_start is None or start is None or start == self.pid_start

    def describe(self) -> str:
        job = f" (SLURM job {self.slurm_job})" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{job} since {self.started}"


def _read(path: Path) -> Owner | None:
    try:
        data = json.loads(path.read_text())
        return Owner(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # not a lock we wrote: treat as an unknown live owner
        return Owner("unknown", -1, None, "?", "")


def _create(path: Path, owner: Owner) -> bool:
    """Create ``path`` holding ``owner``, atomically; False when it exists."""
    tmp = path.with_name(f"{path.name}.{owner.host}.{owner.pid}.{owner.token[:8]}")
    tmp.write_text(json.dumps(asdict(owner)) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


class RunLock:
    """``with RunLock(folder): ...`` owns ``folder`` (exit 73 through :class:`RunFolderBusy` if not)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owner: Owner | None = None

    def acquire(self, attempts: int = 200) -> "RunLock":
        me = Owner.me()
        for _ in range(attempts):
            if _create(self.path, me):
                self.owner = me
                return self
            holder = _read(self.path)
            if holder is None:  # released meanwhile
                continue
            if holder.alive():
                raise RunFolderBusy(
                    f"run folder {self.folder} is in use by {holder.describe()} (its lock {self.path}); wait for "
                    f"it to finish, or use another output_dir (if that process is known to be gone, delete "
                    f"{self.path})")
            if self._take_over(holder, me):
                self.owner = me
                return self
            time.sleep(0.01)
        raise RunFolderBusy(f"could not take the lock {self.path}: it keeps changing hands; try again")

    def _take_over(self, stale: Owner, me: Owner) -> bool:
        takeover = self.folder / TAKEOVER_NAME
        if not _create(takeover, me):
            other = _read(takeover)
            if other is not None and not other.alive():  # a taker that died mid-takeover
                takeover.unlink(missing_ok=True)
            return False
        try:
            if _read(self.path) != stale:  # taken over by someone else since we looked
                return False
            self.path.unlink()
            return _create(self.path, me)
        finally:
            takeover.unlink(missing_ok=True)

    def release(self) -> None:
        if self.owner is not None and _read(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.owner = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
