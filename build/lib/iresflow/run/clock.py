"""The training time of a run: the seconds spent in training steps, not in evaluation.

``time/fit_seconds`` is the wall time of the whole ``trainer.fit`` (validations, pictures and
checkpoints included). Comparing models *at equal compute* needs the cost of training alone:
:class:`TrainingClock` adds up, from each training batch's start to its end (forward, backward,
the optimiser step and the Lipschitz upkeep), the wall time and the process's CPU time (every
thread of this process). It is saved in the checkpoint, so a resumed run keeps counting.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback

__all__ = ["TrainingClock"]


class TrainingClock(Callback):
    """Wall and CPU seconds inside training steps (``train_seconds``, ``train_cpu_seconds``)."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0
        self._started: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is not None:
            wall, cpu = self._started
            self.train_seconds += time.perf_counter() - wall
            self.train_cpu_seconds += time.process_time() - cpu
            self._started = None

    def metrics(self) -> dict[str, float]:
        return {"time/train_seconds": self.train_seconds, "time/train_cpu_seconds": self.train_cpu_seconds}

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.train_cpu_seconds = float(state_dict.get("train_cpu_seconds", 0.0))
