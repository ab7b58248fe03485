"""Signals that stop a run: SIGTERM, SIGUSR1 and SIGINT, each at a batch boundary.

The handler only records the first signal (it decides the exit code: 130 for SIGINT, 75
otherwise). At the end of every training, validation and test batch, :class:`StopSignals`
looks at it; under DDP the ranks first agree (one all-reduce of the signal number, so a
signal to any rank stops all of them, at the same batch). Stopping in training or
validation writes ``last.ckpt`` there, every rank taking part (rank 0 writes); then
:class:`~iresflow.run.errors.Stopped` ends the run. With ``requeue: true`` in a SLURM job
(``SLURM_JOB_ID``; any batch script, ``srun`` or not) rank 0's ``Stopped`` carries the job
to requeue, and the run layer calls :func:`requeue` after status.json, W&B and the lock are
done. A signal that arrives before training
(while the run is built) stops it at once: there is nothing to save yet.

Why not Lightning's own SIGTERM and SLURM-requeue handlers: they talk to the other ranks
(a broadcast, a checkpoint with its barrier) *inside* the signal handler, wherever each
process happens to be; with two DDP processes that deadlocked or failed the checkpoint in
2 of 4 tries here. So Lightning's SLURM environment is used with ``auto_requeue=False``,
and once Lightning has set its handlers up for a loop (``on_train_start``,
``on_test_start``) this handler takes SIGTERM back.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback

from iresflow.run import early_signals
from iresflow.run.errors import Stopped
from iresflow.run.lock import slurm_job_id

__all__ = ["StopSignals", "slurm_job_id", "requeue"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def requeue(stop: Stopped) -> None:
    """``scontrol requeue`` the SLURM job of ``stop`` -- the last thing a stopped run does (its checkpoint,
    status.json, W&B and its lock are done): the requeue SIGTERMs the job at once. The stop line (how to
    resume) is printed first, while the job's output is still collected; the requeue's own SIGTERM is
    then ignored, so the process ends with its exit code 75 instead of dying."""
    job = stop.requeue_job
    print(f"{stop}; requeueing SLURM job {job}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    stop.announced = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"scontrol requeue {job} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}; "
              "resubmit the job to resume it", file=sys.stderr, flush=True)
    else:
        stop.requeued = str(job)


class StopSignals(Callback):
    """``with StopSignals(checkpoint, requeue) as stop: trainer.fit(...)``: the run stops at the
    next batch boundary after a signal, with ``checkpoint`` written (``stop.saved``)."""

    def __init__(self, checkpoint: Path, requeue: bool = False):
        self.checkpoint = Path(checkpoint)
        self.requeue = requeue
        self.signum: int | None = None
        self.training_started = False
        self.saved: Path | None = None
        self.requeued: str | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ the handler
    def __enter__(self) -> "StopSignals":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        early = early_signals.take()  # a signal that came while the process was starting
        if early is not None:
            self.signum = early
            if not self.training_started:
                self.__exit__()
                raise Stopped(early)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if not self.training_started:
            raise Stopped(self.signum)

    def _take_signals_back(self) -> None:
        # Lightning set its own SIGTERM handler when its loop started (see the module docstring)
        if self._previous:
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    # ------------------------------------------------------------------ the batch boundaries
    def _agreed_signal(self, trainer) -> int:
        """The signal to stop for (0: none), the same on every rank."""
        signum = self.signum or 0
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([signum], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _stop_if_asked(self, trainer, save: bool) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        self.signum = self.signum or signum
        if save:
            trainer.save_checkpoint(str(self.checkpoint), weights_only=False)  # the whole state, to resume
            self.saved = self.checkpoint
        job = slurm_job_id()
        stop = Stopped(self.signum, trainer.global_step)
        if self.requeue and signum == signal.SIGUSR1 and job and trainer.is_global_zero:
            # requeued by the run layer *last*: after status.json, W&B and the lock (requeue_job)
            stop.requeue_job = job
        raise stop

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_signals_back()

    def on_test_start(self, trainer, pl_module) -> None:
        self._take_signals_back()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_if_asked(trainer, save=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._stop_if_asked(trainer, save=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stop_if_asked(trainer, save=False)  # training is over and its last checkpoint written
