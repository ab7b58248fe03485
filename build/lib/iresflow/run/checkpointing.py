"""Checkpoints a run can be stopped at any moment around: atomic files, periodic saves,
a save when a signal stops the run, and the random generators inside every checkpoint.

- :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the same
  folder, flushes it to disk and renames it over the old one (``os.replace``): a kill at
  any moment leaves the previous complete file or the new complete file, never half.
- :func:`periodic_checkpoint`: ``checkpoints/last.ckpt`` every ``checkpoint.every_minutes``
  (or ``every_n_steps``), by Lightning's ``ModelCheckpoint``.
- the checkpoint when a signal stops the run is written by :mod:`iresflow.run.signals`;
- :class:`RandomStates`: torch (CPU, every CUDA device), numpy and Python generators of
  every rank are saved with the checkpoint and put back when training resumes, so the
  estimators' Hutchinson probes and Russian-roulette lengths continue the same stream.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from iresflow.tasks.base import random_state, set_random_state

__all__ = ["AtomicCheckpointIO", "periodic_checkpoint", "best_checkpoint", "RandomStates"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>`` beside the target, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by AtomicCheckpointIO")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        try:  # the rename itself reaches the disk with the folder's entry
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some filesystems do not sync folders
            pass
        finally:
            os.close(fd)


def periodic_checkpoint(folder: Path, every_minutes: float | None, every_n_steps: int | None) -> ModelCheckpoint | None:
    """``last.ckpt`` during training: every ``every_n_steps`` steps if set, else every ``every_minutes``."""
    if every_n_steps:
        schedule: dict[str, Any] = {"every_n_train_steps": int(every_n_steps)}
    elif every_minutes:
        schedule = {"train_time_interval": timedelta(minutes=float(every_minutes))}
    else:
        return None
    return ModelCheckpoint(dirpath=str(folder), save_top_k=0, save_last=True, enable_version_counter=False,
                           **schedule)


def best_checkpoint(folder: Path, monitor: str, mode: str) -> ModelCheckpoint:
    """``best.ckpt``: the checkpoint of the best validation ``monitor`` so far."""
    return ModelCheckpoint(dirpath=str(folder), filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           save_last=False, auto_insert_metric_name=False, enable_version_counter=False,
                           save_on_train_epoch_end=False)  # after validations only: they measure "best"


class RandomStates(Callback):
    """Every rank's random generators, saved with each checkpoint and restored at the start
    of resumed training (after everything that seeds or draws while the trainer sets up)."""

    def __init__(self):
        self._to_restore: list[dict[str, Any]] | None = None
        self._module: Any = None

    @property
    def state_key(self) -> str:
        return "RandomStates"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._module = pl_module

    def state_dict(self) -> dict[str, Any]:
        # the training's stream, also when a checkpoint is written in the middle of a validation
        training_state = getattr(self._module, "training_random_state", None)
        mine = training_state() if training_state is not None else random_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)  # every rank saves; rank 0 writes all of them
            return {"ranks": every}
        return {"ranks": [mine]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._to_restore = list(state.get("ranks") or [])

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._to_restore:
            return
        if len(self._to_restore) == trainer.world_size:
            set_random_state(self._to_restore[trainer.global_rank])
        # another number of processes: each rank keeps the stream it seeded itself
        self._to_restore = None
