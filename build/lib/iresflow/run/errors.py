"""Exit codes of ``iresflow train`` / ``eval`` / ``sample`` and the errors that lead to them.

=====  ============================================================================
code   meaning
=====  ============================================================================
0      finished
1      failed: an error, a non-finite final metric, an inverse that failed
2      bad input: one line on stderr saying what to fix
73     the run folder is owned by another live process (its ``.lock``)
75     preempted (SIGTERM / SIGUSR1): a checkpoint was written; the same command with
       ``ckpt_path=auto`` resumes
130    interrupted by SIGINT (Ctrl-C): a checkpoint was written; resumable the same way
=====  ============================================================================

Nothing here imports torch: the command line maps errors to codes before (or without)
loading it.
"""

from __future__ import annotations

import signal

from iresflow.config import ConfigError
from iresflow.registry import PluginImportError, RegistryError

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_BUSY", "EXIT_PREEMPTED", "EXIT_INTERRUPTED",
           "ConfigError", "RunDirError", "RunFolderBusy", "RunFailed", "Stopped", "exit_code_of"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BUSY = 73        # sysexits.h EX_CANTCREAT: the run folder cannot be taken
EXIT_PREEMPTED = 75   # sysexits.h EX_TEMPFAIL: try again (resume)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class RunDirError(ConfigError):
    """A run folder or checkpoint that cannot be used as asked (bad input: exit 2)."""


class RunFolderBusy(RuntimeError):
    """The run folder's lock is held by another live process (exit 73)."""


class RunFailed(RuntimeError):
    """The run ended but its result is not usable: non-finite metrics, a failed inverse,
    a diverged training (exit 1). ``metrics`` holds what was measured."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


class Stopped(BaseException):
    """The run was stopped by a signal (a ``BaseException``, like ``KeyboardInterrupt``).

    ``checkpoint``: the file written when it stopped (None when it stopped before training);
    ``step``: the optimiser steps done; ``resume``: the command that continues it.
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None,
                 resume: str | None = None):
        super().__init__(signum)
        self.signum, self.step, self.checkpoint, self.resume = int(signum), step, checkpoint, resume
        self.requeue_job: str | None = None   # the SLURM job to requeue once the run has shut down
        self.requeued: str | None = None      # the job requeued
        self.announced = False                # the stop line was printed already (before a requeue)

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED

    def __str__(self) -> str:
        what = "interrupted" if self.signum == signal.SIGINT else "preempted"
        where = f" at step {self.step}" if self.step is not None else ""
        saved = (f"; checkpoint written: {self.checkpoint}" if self.checkpoint
                 else "; no checkpoint yet (training had not started)")
        resume = f"; resume with: {self.resume}" if self.resume else ""
        return f"{what} by {signal.Signals(self.signum).name}{where}{saved}{resume}"


def exit_code_of(err: BaseException) -> int:
    """The exit code an error means (see the module docstring)."""
    if isinstance(err, Stopped):
        return err.exit_code
    if isinstance(err, RunFolderBusy):
        return EXIT_BUSY
    if isinstance(err, (ConfigError, RegistryError, PluginImportError)):
        return EXIT_BAD_INPUT
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED
