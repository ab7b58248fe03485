"""Signals that stop a run: SIGTERM, SIGUSR1 and SIGINT, each at a batch boundary.

Lightning stops its loops for SIGTERM: its handler marks the trainer, and the loops raise
``SIGTERMException`` at the next batch boundary (under DDP all ranks together, rank 0's
decision broadcast), where :class:`~iresflow.run.checkpointing.CheckpointOnStop` writes
the checkpoint. :class:`StopSignals` routes the other two there: it records the first
signal (which decides the exit code: 130 for SIGINT, 75 otherwise) and sends SIGTERM to
its own process. A signal that arrives while the trainer is setting up waits for the
loops (it is forwarded at the start of training); one that arrives before training,
while the run is being built, stops at once (nothing to save yet).

With ``requeue: true`` on SLURM, SIGUSR1 is left to Lightning's SLURM environment
(checkpoint and ``scontrol requeue``); SLURM then ends the job with SIGTERM.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback

from iresflow.run.errors import Stopped

__all__ = ["StopSignals"]


class StopSignals(Callback):
    """``with StopSignals(usr1=True) as stop: ...``; ``stop.signum`` is the first signal seen."""

    def __init__(self, usr1: bool = True):
        self.signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if usr1 else [])
        self.signum: int | None = None
        self.training_started = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _lightning_listens(self) -> bool:
        # while Lightning runs a loop, its own handler holds SIGTERM (and calls ours with it)
        return signal.getsignal(signal.SIGTERM) is not self._handle

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self._lightning_listens():
            if signum != signal.SIGTERM and first:
                os.kill(os.getpid(), signal.SIGTERM)
        elif not self.training_started:
            raise Stopped(self.signum)

    # ------------------------------------------------------------------ callback: late signals
    def _forward(self, trainer) -> None:
        if self.signum is not None and not trainer.received_sigterm and self._lightning_listens():
            os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.training_started = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._forward(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._forward(trainer)
