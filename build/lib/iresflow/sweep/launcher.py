"""The launcher: runs a sweep's runs as processes, ``parallel`` at a time, and stops them in order.

- Each run is started in a slot; with ``gpus`` slot ``i`` sees GPU ``gpus[i % len(gpus)]``
  (``CUDA_VISIBLE_DEVICES``) and the CPU threads are divided among the slots.
- Every attempt appends to ``logs/<run_id>.log`` under a header (attempt number, time, host,
  command) and is kept in ``logs/<run_id>.json`` (status, exit code, wall time of each).
- A first SIGTERM, SIGINT or SIGHUP of the sweep starts no more runs and forwards the signal
  (SIGHUP as SIGTERM) to every live run's leading process, which checkpoints, stops its own
  workers (as Lightning stops its DDP ranks) and exits. Signalling the whole group at once
  would kill data-loader workers under a run that is still writing its checkpoint, so the
  rest of the group gets SIGTERM only once the leader has exited. After ``grace`` seconds, or
  at a second signal, whatever is left of a run's process group is SIGKILLed. These runs are
  ``interrupted`` and resume on the next invocation.
- ``timeout``: a run still going after that many seconds is stopped the same way and is
  ``failed``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Sequence

from iresflow.sweep.outcome import (HOST, Attempt, Folder, Record, RunResult, classify, current_result, error_line,
                                    now_iso, read_json, tail, write_json)
from iresflow.sweep.plan import Run
from iresflow.sweep.processes import StopSignals, group_members, send, signal_group, spawn

__all__ = ["SweepResult", "run_sweep", "DEFAULT_GRACE"]

DEFAULT_GRACE = 60.0
POLL_SECONDS = 0.05
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM}


@dataclass
class SweepResult:
    """Every run's result (in the order given) and the signal that stopped the sweep, if any."""

    runs: list[RunResult]
    stopped_by: int | None = None


@dataclass
class _Live:
    """A run whose process is running."""

    run: Run
    proc: subprocess.Popen
    record: Record
    attempt: Attempt
    slot: int
    log: IO
    log_offset: int
    started: float
    stop_requested: bool = False    # the sweep is shutting down and asked it to stop
    timed_out: bool = False
    kill_at: float | None = None    # when its group gets SIGKILL
    killed: bool = False


@dataclass
class _Straggler:
    """What is left of a run's process group after its leader exited during a stop."""

    pgid: int
    kill_at: float


@dataclass
class _Launcher:
    """The state of one invocation's runs: the live ones, the groups left to end, the results."""

    name: str
    parallel: int
    gpus: Sequence[str] | None
    timeout: float | None
    grace: float
    echo: bool
    live: list[_Live] = field(default_factory=list)
    stragglers: list[_Straggler] = field(default_factory=list)
    results: dict[str, RunResult] = field(default_factory=dict)
    signals_seen: int = 0

    def env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("WANDB_RUN_GROUP", self.name)  # grouping also for programs without logger.group
        env["IRESFLOW_SWEEP"] = self.name
        threads = max(1, (os.cpu_count() or 1) // self.parallel)
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)  # K runs share the CPU cores
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return env

    def say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    # ----------------------------------------------------------------- one attempt

    def start(self, run: Run, slot: int) -> bool:
        """Start an attempt of ``run`` in ``slot``; False when its program could not be started."""
        record = Record.load(run)
        gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
        attempt = Attempt(number=len(record.attempts) + 1, started=now_iso(), command=run.command, gpu=gpu)
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        if str(run.args_json_path) in run.command:
            write_json(run.args_json_path, {**run.config, **run.extra})
        log = open(run.log_path, "a")
        offset = log.tell()
        where = f" · GPU {gpu}" if gpu is not None else ""
        log.write(f"{'' if offset == 0 else chr(10)}===== attempt {attempt.number} · {attempt.started} · "
                  f"{HOST}{where}\n$ {shlex.join(run.command)}\n\n")
        log.flush()
        self.say(f"[{run.index + 1}] start {run.run_id}" + (f" (attempt {attempt.number})" if attempt.number > 1
                                                            else "") + (f" on GPU {gpu}" if gpu else ""))
        try:
            proc = spawn(run.command, env=self.env(slot), log=log)
        except OSError as err:  # a run that cannot even start is a failed run, not a failed sweep
            attempt.status, attempt.ended, attempt.wall_time = "failed", now_iso(), 0.0
            attempt.note = f"error: could not start the run: {type(err).__name__}: {err}"
            log.write(attempt.note + "\n")
            log.close()
            self.settle(record, run, attempt, attempt.note)
            return False
        attempt.pid = proc.pid
        record.attempts.append(attempt)
        record.status = "running"
        record.save(run)
        self.live.append(_Live(run, proc, record, attempt, slot, log, offset, time.monotonic()))
        return True

    def finish(self, lv: _Live, exit_code: int) -> None:
        """The attempt's process has ended: classify, log, record."""
        folder = Folder.read(lv.run.output_dir)
        status, note = classify(exit_code, folder, stopped=lv.stop_requested,
                                timed_out_after=self.timeout if lv.timed_out else None)
        attempt = lv.attempt
        attempt.status, attempt.exit_code, attempt.note = status, exit_code, note
        attempt.wall_time = round(time.monotonic() - lv.started, 3)
        attempt.ended = now_iso()
        error = ""
        if status == "failed":
            error = tail(lv.run.log_path, lv.log_offset)
            if note and note not in error:
                error += "\n" + note
        elif status in ("interrupted", "busy"):
            error = note
        lv.log.write(f"\n----- attempt {attempt.number}: {status} (exit {exit_code}) after "
                     f"{attempt.wall_time:.1f} s{'; ' + note if note else ''}\n")
        lv.log.close()
        self.settle(lv.record, lv.run, attempt, error)
        if lv.stop_requested or lv.timed_out:
            pgid = lv.proc.pid
            if group_members(pgid):  # workers the leader left behind
                signal_group(pgid, signal.SIGTERM)
                self.stragglers.append(_Straggler(pgid, time.monotonic() + self.grace))

    def settle(self, record: Record, run: Run, attempt: Attempt, error: str) -> None:
        if attempt not in record.attempts:
            record.attempts.append(attempt)
        record.status, record.error = attempt.status, error
        record.save(run)
        metrics = read_json(run.output_dir / "metrics.json")
        self.results[run.run_id] = RunResult(run, attempt.status, metrics, error, record.attempts)
        msg = f"{attempt.status} in {attempt.wall_time or 0:.1f} s"
        if attempt.status == "failed":
            msg += f" (exit {attempt.exit_code}): {error_line(error)}  [log: {run.log_path}]"
        elif attempt.status != "finished":
            msg += f" (exit {attempt.exit_code}): {attempt.note}"
        self.say(f"[{run.index + 1}] {run.run_id}: {msg}")

    # ----------------------------------------------------------------- stopping

    def on_signals(self, received: list[int]) -> None:
        """First signal: forward it to every live run; a second: SIGKILL them now."""
        if len(received) == self.signals_seen:
            return
        first = self.signals_seen == 0
        self.signals_seen = len(received)
        now = time.monotonic()
        if first:
            sig = FORWARDED.get(received[0], signal.SIGTERM)
            self.say(f"sweep {self.name}: {signal.Signals(received[0]).name}: stopping {len(self.live)} run(s) "
                     f"({signal.Signals(sig).name}; SIGKILL after {self.grace:g} s or at a second signal)")
            for lv in self.live:
                lv.stop_requested = True
                send(lv.proc, sig)
                lv.kill_at = now + self.grace if lv.kill_at is None else min(lv.kill_at, now + self.grace)
        else:
            for lv in self.live:
                lv.kill_at = now
            for st in self.stragglers:
                st.kill_at = now

    def enforce_deadlines(self) -> None:
        now = time.monotonic()
        for lv in self.live:
            if self.timeout is not None and not lv.timed_out and not lv.stop_requested \
                    and now - lv.started > self.timeout:
                lv.timed_out = True
                send(lv.proc, signal.SIGTERM)
                lv.kill_at = now + self.grace
            if lv.kill_at is not None and now >= lv.kill_at and not lv.killed:
                lv.killed = True
                signal_group(lv.proc.pid, signal.SIGKILL)
        for st in list(self.stragglers):
            if not group_members(st.pgid):
                self.stragglers.remove(st)
            elif now >= st.kill_at:
                signal_group(st.pgid, signal.SIGKILL)
                self.stragglers.remove(st)

    # ----------------------------------------------------------------- the loop

    def run(self, todo: list[Run], signals: StopSignals) -> None:
        queue = deque(todo)
        free = list(range(self.parallel))
        try:
            while (queue and not signals.received) or self.live or self.stragglers:
                self.on_signals(signals.received)
                while queue and free and not signals.received:
                    slot = free.pop(0)
                    if not self.start(queue.popleft(), slot):
                        free.insert(0, slot)
                for lv in list(self.live):
                    code = lv.proc.poll()
                    if code is not None:
                        self.live.remove(lv)
                        free.append(lv.slot)
                        self.finish(lv, code)
                self.enforce_deadlines()
                time.sleep(POLL_SECONDS)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """The loop ended with runs still live (an error in the sweep itself): stop them as at a
        signal, waiting at most ``grace``, rather than leave them running unwatched."""
        for lv in self.live:
            send(lv.proc, signal.SIGTERM)
        for lv in self.live:
            try:
                lv.proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                pass
            signal_group(lv.proc.pid, signal.SIGKILL)
            lv.log.close()


def run_sweep(runs: list[Run], *, name: str = "sweep", parallel: int = 1, gpus: Sequence[str] | None = None,
              timeout: float | None = None, grace: float = DEFAULT_GRACE, echo: bool = True) -> SweepResult:
    """Run every run that has not finished (``parallel`` at a time); the finished ones are
    ``cached``. Failures are recorded, never raised; a stop signal ends the sweep in order."""
    current = [current_result(run) for run in runs]
    todo = [r.run for r in current if r.status != "cached"]
    if echo:
        print(f"sweep {name}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run"
              f" ({parallel} at a time{', GPUs ' + ','.join(gpus) if gpus else ''})", flush=True)
    launcher = _Launcher(name, max(1, parallel), list(gpus) if gpus else None, timeout, grace, echo)
    with StopSignals() as signals:
        launcher.run(todo, signals)
    stopped_by = signals.received[0] if signals.received else None
    return SweepResult([launcher.results.get(r.run_id, r) for r in current], stopped_by)
