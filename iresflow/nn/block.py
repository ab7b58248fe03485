"""The invertible residual block ``F(x) = x + g(x)`` with its inverse and log-det.

A block bundles three swappable choices: the residual function ``g`` (which
must satisfy ``Lip(g) < 1``), the inverse solver and the log-det estimator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Imported for their registrations, so the names below resolve even when the
# block is used without importing the whole ``iresflow.nn`` package.
from iresflow.nn import logdet as _logdet  # noqa: F401
from iresflow.nn import solvers as _solvers  # noqa: F401
from iresflow.nn.solvers import SolveInfo
from iresflow.registry import build_node

__all__ = ["InvertibleResidualBlock"]


class InvertibleResidualBlock(nn.Module):
    """``y = x + g(x)``; invertible because ``Lip(g) < 1``.

    Args:
        g: the residual function (an ``nn.Module``).
        solver: object with ``solve(f, y, x0=None)``, a registered ``solver`` name,
            or a config node ``{name: ..., **params}``. Default ``"fixed_point"``.
        estimator: log-det estimator module, name or node. Default ``"russian_roulette"``.
    """

    def __init__(self, g: nn.Module, solver: Any = None, estimator: Any = None):
        super().__init__()
        self.g = g
        self.solver = build_node("solver", "fixed_point" if solver is None else solver)
        self.estimator = build_node("estimator", "russian_roulette" if estimator is None else estimator)
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
