"""The files of one run folder, each written atomically (a temporary file, then ``os.replace``).

- ``config.yaml``: the resolved config, written once when the run starts; never rewritten;
- ``changes.yaml``: one entry per resume that was allowed to change settings
  (``resume_changes=allow``): when, which attempt, each key's old and new value;
- ``status.json``: ``{"status": "running"|"finished"|"interrupted"|"failed", "exit_code",
  "message", "attempt", "host", "pid", "updated"}``, rewritten at every change;
- ``metrics.json``: the final metrics (flat name -> number; non-finite values as strings);
- ``checkpoints/last.ckpt`` (+ ``best.ckpt``), pictures, the logger's files, ``.lock``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from iresflow.files import write_atomic
from iresflow.run.errors import RunDirError
from iresflow.run.lock import LOCK_NAME

__all__ = ["RunFolder", "write_atomic", "write_metrics_json"]

STATUSES = ("running", "finished", "interrupted", "failed")




def write_metrics_json(path: Path, metrics: dict[str, float]) -> None:
    """Flat name -> number, sorted; a non-finite value is written as its text (``"nan"``)."""
    clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
    write_atomic(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class RunFolder:
    """One run's folder and the files the run layer writes into it."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.created = False  # whether this process created the folder (and removes it if the start fails)

    # ------------------------------------------------------------------ files
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def changes_file(self) -> Path:
        return self.path / "changes.yaml"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    # ------------------------------------------------------------------ the folder
    def create(self) -> None:
        """Create the folder (and its parents) and check it can be written; bad input if not."""
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            self.created = False
            raise RunDirError(f"output_dir {self.path} cannot be written ({err.strerror or err}); choose a "
                              "writable output_dir") from err

    def contents(self) -> list[Path]:
        """What the folder holds, besides its lock."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if not p.name.startswith(LOCK_NAME))

    def is_empty(self) -> bool:
        return not self.contents()

    def listing(self, limit: int = 6) -> str:
        names = [p.name for p in self.contents()]
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

    def is_unfinished_attempt(self) -> bool:
        """An iresflow run that stopped before it wrote a checkpoint or its metrics."""
        ours = self.config_file.is_file() or self.status_file.is_file()
        return ours and not self.metrics_file.is_file() and not self.last_checkpoint.is_file()

    def clear(self) -> None:
        """Remove everything but the lock (``overwrite=true``, or an attempt without a checkpoint)."""
        for p in self.contents():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def remove_if_created(self) -> None:
        """After a start that failed before training: leave nothing behind (the lock goes with it)."""
        if self.created and self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)

    # ------------------------------------------------------------------ config and changes
    def recorded_config(self) -> dict[str, Any] | None:
        if not self.config_file.is_file():
            return None
        with open(self.config_file) as f:
            return yaml.safe_load(f)

    def write_config(self, text: str) -> None:
        write_atomic(self.config_file, text)

    def record_changes(self, attempt: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """Append one entry to ``changes.yaml`` (the run's config.yaml stays as it was)."""
        entries = []
        if self.changes_file.is_file():
            with open(self.changes_file) as f:
                entries = yaml.safe_load(f) or []
        entries.append({"time": _now(), "attempt": attempt,
                        "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}})
        write_atomic(self.changes_file, yaml.safe_dump(entries, sort_keys=False))

    # ------------------------------------------------------------------ status and metrics
    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def next_attempt(self) -> int:
        previous = self.status() or {}
        return int(previous.get("attempt", 0)) + 1

    def write_status(self, status: str, attempt: int, message: str = "", exit_code: int | None = None) -> None:
        assert status in STATUSES, status
        record = {"status": status, "exit_code": exit_code, "message": message, "attempt": attempt,
                  "host": socket.gethostname(), "pid": os.getpid(), "updated": _now()}
        write_atomic(self.status_file, json.dumps(record, indent=2) + "\n")

    def write_metrics(self, metrics: dict[str, float]) -> None:
        write_metrics_json(self.metrics_file, metrics)
