"""What became of a run: its folder's state, the sweep's record of its attempts, and what an
exit code means.

The run folder's ``status.json`` (written by the program: ``running``, ``finished``,
``interrupted`` or ``failed``, with the owner's host and pid) decides when it is there; a folder
without one counts as finished when it holds ``metrics.json``. The exit codes are those of
``iresflow train``: 0 finished, 73 the folder is owned by another live process, 75 preempted
(SIGTERM / SIGUSR1) and 130 interrupted (SIGINT), both after writing a checkpoint; anything
else failed.

A run's status in a sweep: ``finished`` (now), ``cached`` (finished before), ``failed``,
``interrupted`` (resumes on the next invocation), ``busy`` (another process owns its folder),
``running`` (its owner is alive elsewhere) or ``pending`` (not started).
"""

from __future__ import annotations

import os
import re
import signal
import socket
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from iresflow.files import read_json, write_json
from iresflow.sweep.plan import Run

__all__ = ["EXIT_BUSY", "EXIT_PREEMPTED", "EXIT_INTERRUPTED", "Folder", "Attempt", "Record", "RunResult",
           "classify", "current_result", "process_alive", "now_iso", "tail", "error_line"]

EXIT_BUSY, EXIT_PREEMPTED, EXIT_INTERRUPTED = 73, 75, 130
HOST = socket.gethostname()
LOG_TAIL_LINES = 20


def now_iso() -> str:
    """The local time with its UTC offset, e.g. ``2025-01-31T12:00:00+01:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def seconds_between(start: str, end: str) -> float:
    """``end - start`` in seconds, for ISO times with or without an offset (without: local time)."""
    def parse(text: str) -> datetime:
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.astimezone()

    return (parse(end) - parse(start)).total_seconds()




def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


@dataclass(frozen=True)
class Folder:
    """The files of a run folder that say how far the run got."""

    path: Path
    status: dict[str, Any]          # status.json, {} when absent
    has_metrics: bool               # metrics.json
    has_checkpoint: bool            # checkpoints/last.ckpt

    @classmethod
    def read(cls, path: Path) -> "Folder":
        return cls(path, read_json(path / "status.json"), (path / "metrics.json").is_file(),
                   (path / "checkpoints" / "last.ckpt").is_file())

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    @property
    def done(self) -> bool:
        return self.status.get("status") == "finished" if self.status else self.has_metrics

    @property
    def state(self) -> str | None:
        """status.json's status, ``interrupted`` for a ``running`` whose owner on this host is dead
        (killed without a chance to say so); None without status.json."""
        state = self.status.get("status")
        if state == "running" and self.status.get("host") == HOST:
            pid = self.status.get("pid")
            if not (isinstance(pid, int) and pid > 0 and process_alive(pid)):
                return "interrupted"
        return state


@dataclass
class Attempt:
    """One start of a run's program."""

    number: int
    started: str
    command: list[str]
    host: str = HOST
    pid: int | None = None
    gpu: str | None = None
    status: str = "running"
    exit_code: int | None = None
    wall_time: float | None = None
    ended: str | None = None
    note: str = ""


@dataclass
class Record:
    """logs/<run_id>.json: the sweep's account of one run across invocations."""

    run_id: str
    config: dict[str, Any]
    status: str = "pending"
    error: str = ""
    attempts: list[Attempt] = field(default_factory=list)

    @classmethod
    def load(cls, run: Run) -> "Record":
        data = read_json(run.record_path)
        names = {f.name for f in fields(Attempt)}
        attempts = [Attempt(**{k: v for k, v in a.items() if k in names})
                    for a in data.get("attempts", []) if isinstance(a, dict)]
        if not attempts and data.get("status") in ("failed", "finished"):  # a record of one attempt
            attempts = [Attempt(number=1, started=data.get("finished_at", ""), command=data.get("command", []),
                                status=data["status"], exit_code=data.get("returncode"),
                                wall_time=data.get("wall_time"))]
        record = cls(run.run_id, run.config, data.get("status", "pending"), data.get("error", ""), attempts)
        record.settle(Folder.read(run.output_dir))
        return record

    def save(self, run: Run) -> None:
        data = {"run_id": self.run_id, "status": self.status, "error": self.error, "config": self.config,
                "command": run.command, "attempts": [asdict(a) for a in self.attempts], "updated": now_iso()}
        write_json(run.record_path, data)

    def settle(self, folder: Folder) -> None:
        """An attempt still ``running`` whose process is gone (its sweep was killed) takes the end
        its folder reports, else ``interrupted``."""
        last = self.attempts[-1] if self.attempts else None
        if last is None or last.status != "running":
            return
        if last.host != HOST or (last.pid is not None and last.pid > 0 and process_alive(last.pid)):
            return  # may still run: on another machine, or here
        said = folder.status if folder.status.get("status") in ("finished", "interrupted", "failed") else {}
        try:
            seconds = seconds_between(last.started, str(said["updated"]))
        except (KeyError, ValueError):
            seconds = None  # no time of the end: the attempt's wall time stays unknown
        if seconds is not None and seconds < 0:  # status.json of an earlier attempt: this one said nothing
            said, seconds = {}, None
        last.status = said.get("status", "interrupted")
        last.exit_code = said.get("exit_code")
        last.wall_time, last.ended = seconds, said.get("updated")
        last.note = "the sweep ended before this attempt did; its end is from the run folder" if said else \
            "the sweep ended before this attempt did, and the run folder does not say how it ended"
        self.status = last.status


@dataclass
class RunResult:
    """Where one run of a sweep stands."""

    run: Run
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def config(self) -> dict[str, Any]:
        return self.run.config

    @property
    def wall_time(self) -> float | None:
        """Seconds over all attempts (None when no attempt's time is known)."""
        times = [a.wall_time for a in self.attempts if a.wall_time is not None]
        return sum(times) if times else None

    @property
    def returncode(self) -> int | None:
        return self.attempts[-1].exit_code if self.attempts else None


def classify(exit_code: int, folder: Folder, *, stopped: bool = False,
             timed_out_after: float | None = None) -> tuple[str, str]:
    """``(status, note)`` of an attempt that ended with ``exit_code``; ``stopped``: the sweep
    asked it to stop (its own shutdown); ``timed_out_after``: it was stopped at ``--timeout``."""
    if exit_code == 0 and folder.done:
        return "finished", ""
    if exit_code == EXIT_BUSY:
        return "busy", f"its run folder is owned by another live process (exit {EXIT_BUSY}); skipped"
    if stopped:
        return "interrupted", "stopped by the sweep"
    if timed_out_after is not None:
        return "failed", f"error: the run exceeded the sweep's --timeout of {timed_out_after:g} s"
    if exit_code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        return "interrupted", f"exit {exit_code}: stopped after writing a checkpoint"
    if exit_code == 0:
        said = folder.status.get("status")
        why = f"{folder.path / 'status.json'} says {said!r}" if said else f"no {folder.path / 'metrics.json'}"
        return "failed", f"error: exit code 0 but {why}"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return "failed", f"error: killed by {name}"
    return "failed", ""


def current_result(run: Run) -> RunResult:
    """The run's standing from its files, without starting anything."""
    folder = Folder.read(run.output_dir)
    record = Record.load(run)
    metrics = read_json(run.output_dir / "metrics.json")
    if folder.done:
        return RunResult(run, "cached", metrics, "", record.attempts)
    state = folder.state
    if state in ("interrupted", "failed", "running"):
        error = record.error if record.status == state else str(folder.status.get("message", ""))
        return RunResult(run, state, metrics, error, record.attempts)
    if record.status in ("failed", "interrupted", "busy"):
        return RunResult(run, record.status, metrics, record.error, record.attempts)
    return RunResult(run, "pending", metrics, "", record.attempts)


def tail(path: Path, offset: int = 0, n: int = LOG_TAIL_LINES) -> str:
    """The last ``n`` non-blank lines of ``path`` from byte ``offset`` on (one attempt's output)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def error_line(text: str) -> str:
    """The most telling line of a failed run's output: the last that mentions an error,
    exception or traceback, else the last line."""
    lines = text.splitlines()
    for ln in reversed(lines):
        if re.search(r"(error|exception|traceback)", ln, re.IGNORECASE):
            return ln.strip()
    return lines[-1].strip() if lines else ""
