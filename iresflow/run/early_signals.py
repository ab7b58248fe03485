"""Stop signals that arrive before the run's own handler is in place (while Python imports torch).

A scheduler can signal a job within its first seconds (SLURM's ``--signal`` fires up to a minute
early; a preemption comes when it comes). SIGUSR1's default action kills the process, and a
SIGTERM then would end it with 143 instead of the documented 75. ``iresflow train`` therefore
installs :func:`install` first thing: it only records the signal, and
:class:`iresflow.run.signals.StopSignals` acts on it as soon as it takes over (the run then stops
before training, exit 75, requeued when asked). No torch here: this module must import fast.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["install", "take"]

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: int | None = None


def _record(signum: int, frame: Any) -> None:
    global _received
    if _received is None:
        _received = signum


def install() -> None:
    """Record SIGTERM and SIGUSR1 from now on (until a run installs its own handler)."""
    for sig in _SIGNALS:
        signal.signal(sig, _record)


def take() -> int | None:
    """The signal recorded so far (None: none), forgotten once taken."""
    global _received
    received, _received = _received, None
    return received
