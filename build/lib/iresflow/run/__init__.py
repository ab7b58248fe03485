"""The run layer: ``iresflow train`` / ``eval`` / ``sample`` and the run folder they work in.

====================  =====================================================================
module                job
====================  =====================================================================
``commands``          the ``iresflow`` command line, errors -> one line and an exit code
``errors``            exit codes and the errors that mean them
``paths``             which run folder and which checkpoint a command uses
``folder``            the run folder's files (``config.yaml``, ``status.json``, ...), atomically
``lock``              one owner per run folder (``.lock``)
``resume``            what a resume may change; whether a checkpoint fits the run
``build``             components, logger and trainer settings from a config
``checkpointing``     atomic, periodic and on-signal checkpoints; random states inside them
``signals``           SIGTERM / SIGUSR1 / SIGINT stop a run at a batch boundary
``training``          one attempt of a run, start to finish
``evaluation``        ``eval`` and ``sample`` from a checkpoint
====================  =====================================================================

Python API: :func:`train` (config in, :class:`TrainResult` out), :func:`evaluate`,
:func:`sample`, :func:`main`. Only ``build``, ``checkpointing``, ``signals`` and the
commands' work import torch or Lightning, when used.
"""

from __future__ import annotations

from typing import Any

from iresflow.run.commands import main
from iresflow.run.errors import RunDirError, RunFailed, RunFolderBusy, Stopped
from iresflow.run.training import TrainResult, resume_command, train

__all__ = ["main", "train", "evaluate", "sample", "TrainResult", "EvalResult", "resume_command", "RunDirError",
           "RunFailed", "RunFolderBusy", "Stopped"]


def __getattr__(name: str) -> Any:  # evaluate / sample import their module only when asked for
    if name in ("evaluate", "sample", "EvalResult"):
        from iresflow.run import evaluation as module

        return getattr(module, name)
    raise AttributeError(name)
