"""The invertible residual block ``F(x) = x + g(x)`` with its inverse and log-det.

A block bundles three swappable choices: the residual function ``g`` (which
must satisfy ``Lip(g) < 1``), the inverse solver and the log-det estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from iresflow.nn.logdet import RussianRouletteLogDet
from iresflow.nn.solvers import FixedPointSolver, SolveInfo
from iresflow.registry import Factory, instance, register

__all__ = ["InvertibleResidualBlock"]


def _one(spec: Any) -> Any:
    """The component for this block: a factory is called, a built object is used as given
    (a name or node is refused by :func:`iresflow.registry.instance`, with the remedy)."""
    return instance(spec) if isinstance(spec, (Factory, str, Mapping)) else spec


@register("block", "residual", description="residual block y = x + g(x), Lip(g) < 1 (i-ResNet): explicit "
                                          "forward, solved inverse")
class InvertibleResidualBlock(nn.Module):
    """``y = x + g(x)``; invertible because ``Lip(g) < 1``.

    Args:
        g: the residual function (an ``nn.Module``).
        solver: an object with ``solve(f, y, x0=None)``, or a factory of one
            (:class:`iresflow.registry.Factory`). Default: fixed-point iteration.
        estimator: a log-det estimator module, or a factory of one. Default:
            Russian roulette. (Config nodes are turned into factories by
            :func:`iresflow.registry.build`; a built object given here is used as is.)
    """

    def __init__(self, g: nn.Module, solver: Any = None, estimator: Any = None):
        super().__init__()
        self.g = g
        self.solver = FixedPointSolver() if solver is None else _one(solver)
        self.estimator = RussianRouletteLogDet() if estimator is None else _one(estimator)
        self.last_solve_info: SolveInfo | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.g(x)

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + g(x), log|det(I + J_g(x))|[B])``; ``g`` is evaluated once, by the estimator."""
        gx, logdet = self.estimator(self.g, x)
        return x + gx, logdet

    def inverse(self, y: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Solve ``x + g(x) = y`` without grad; the solve's report is kept in ``last_solve_info``.

        ``g`` is run in eval mode during the solve: in training mode spectrally
        normalised layers would run a power iteration at every call and change
        ``g`` under the solver's feet. (Eval mode uses the vectors stored by the
        last training forward, i.e. the same normalised weights.)
        """
        was_training = self.g.training
        self.g.eval()
        try:
            with torch.no_grad():
                x, info = self.solver.solve(self.g, y, x0)
        finally:
            self.g.train(was_training)
        self.last_solve_info = info
        return x

    def lipschitz_bound(self) -> float:
        """The certified bound on ``Lip(g)``, from ``g.lipschitz_bound()``."""
        return float(self.g.lipschitz_bound())

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}"
