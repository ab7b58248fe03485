"""Signals that stop a run: SIGTERM, SIGUSR1 and SIGINT, each at a batch boundary.

The handler only records the first signal (it decides the exit code: 130 for SIGINT, 75
otherwise). At the end of every training, validation and test batch, :class:`StopSignals`
looks at it; under DDP the ranks first agree (one all-reduce of the signal number, so a
signal to any rank stops all of them, at the same batch). Stopping in training or
validation writes ``last.ckpt`` there, every rank taking part (rank 0 writes); with
``requeue: true`` on SLURM, rank 0 then runs ``scontrol requeue`` for the job; then
:class:`~iresflow.run.errors.Stopped` ends the run. A signal that arrives before training
(while the run is built) stops it at once: there is nothing to save yet.

Why not Lightning's own SIGTERM and SLURM-requeue handlers: they talk to the other ranks
(a broadcast, a checkpoint with its barrier) *inside* the signal handler, wherever each
process happens to be; with two DDP processes that deadlocked or failed the checkpoint in
2 of 4 tries here. So Lightning's SLURM environment is used with ``auto_requeue=False``,
and once Lightning has set its handlers up for a loop (``on_train_start``,
``on_test_start``) this handler takes SIGTERM back.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback

from iresflow.run.errors import Stopped

__all__ = ["StopSignals", "slurm_job_id"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def slurm_job_id() -> str | None:
    """The job to requeue (an array task is ``<array job>_<task>``), None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


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
        if self.requeue and signum == signal.SIGUSR1 and job and trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", job], check=False)
            self.requeued = job
        raise Stopped(self.signum, trainer.global_step)

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
