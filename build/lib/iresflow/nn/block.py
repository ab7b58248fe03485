"""Contraction blocks (kind ``block``) and the invertible residual block ``F(x) = x + g(x)``.

A block bundles three swappable choices: the residual function ``g`` (which
must satisfy ``Lip(g) < 1``), the inverse solver and the log-det estimator.
:class:`ContractionBlock` is what every block kind shares (``residual`` here,
``implicit`` in :mod:`iresflow.nn.implicit`, or a plugin's): models, tasks and
diagnostics recognise blocks by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from iresflow.nn.logdet import RussianRouletteLogDet
from iresflow.nn.solvers import FixedPointSolver, SolveInfo
from iresflow.registry import Factory, instance, register

__all__ = ["ContractionBlock", "InvertibleResidualBlock"]


def _one(spec: Any) -> Any:
    """The component for this block: a factory is called, a built object is used as given
    (a name or node is refused by :func:`iresflow.registry.instance`, with the remedy)."""
    return instance(spec) if isinstance(spec, (Factory, str, Mapping)) else spec


class ContractionBlock(nn.Module):
    """Base of the block kind: an invertible map built from Lipschitz-constrained residual functions.

    A block has ``forward(x)``, ``forward_and_logdet(x) -> (y, logdet[B])``, ``inverse(y)``,
    ``last_solve_info`` (the last solve's :class:`SolveInfo`, or None), ``lipschitz_bound()``
    (the largest certified bound of its residual functions) and names the attributes that hold
    its log-det estimators in ``estimator_names`` (a task swaps them for evaluation).
    """

    #: the attributes holding this block's log-det estimators
    estimator_names: tuple[str, ...] = ("estimator",)
    last_solve_info: SolveInfo | None = None

    def residual_functions(self) -> list[nn.Module]:
        """The residual functions whose ``Lip < 1`` makes the block invertible."""
        raise NotImplementedError

    def estimators(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.estimator_names]

    def lipschitz_bound(self) -> float:
        """The largest certified bound of the residual functions (``g.lipschitz_bound()``)."""
        return max(float(g.lipschitz_bound()) for g in self.residual_functions())

    def invertible_by_construction(self) -> bool:
        """Whether every residual function's normalisation constrains ``Lip(g)`` (False for the
        deliberately unconstrained ``normalization: none``)."""
        return all(bool(getattr(getattr(g, "normalization", None), "constrains", True))
                   for g in self.residual_functions())


@register("block", "residual", description="residual block y = x + g(x), Lip(g) < 1 (i-ResNet): explicit "
                                          "forward, solved inverse")
class InvertibleResidualBlock(ContractionBlock):
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

    def residual_functions(self) -> list[nn.Module]:
        return [self.g]

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}"
