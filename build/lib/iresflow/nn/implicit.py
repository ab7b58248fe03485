"""The implicit block (ImpFlow, Lu et al. 2021): ``z = F(x)`` defined by ``z + g_z(z) = x + g_x(x)``.

With ``Lip(g_x) < 1`` and ``Lip(g_z) < 1`` both sides are invertible residual
maps, so ``F = (I + g_z)^{-1} o (I + g_x)`` is a bijection -- a composition that
a single residual block cannot express in general. Every direction needs a solve:

* forward: ``z`` is the root of ``z + g_z(z) - (x + g_x(x))`` (Broyden by default);
* inverse: ``x`` is the root of ``x + g_x(x) - (z + g_z(z))``.

Log-determinant: ``J_F = (I + J_gz(z))^{-1} (I + J_gx(x))``, so
``log|det J_F(x)| = log|det(I + J_gx(x))| - log|det(I + J_gz(z))|``, each term from
its own instance of the log-det estimators of :mod:`iresflow.nn.logdet` (any
estimator and gradient mode).

Gradient through the solve, by implicit differentiation: differentiating
``z + g_z(z; theta_z) = r`` with ``r = x + g_x(x; theta_x)`` gives
``(I + J_gz(z)) dz = dr - (dg_z/dtheta_z) dtheta_z``. For an upstream gradient ``v``
of ``z`` one linear solve against the transposed Jacobian,

    ``(I + J_gz(z))^T w = v``,   i.e.  ``w + J_gz(z)^T w = v``

(a contraction: ``||J_gz^T|| = ||J_gz|| < 1``, solved iteratively with
vector-Jacobian products), gives ``dL/dr = w`` (which autograd carries on through
``r = x + g_x(x)`` to ``x`` and ``theta_x``) and ``dL/dtheta_z = -(dg_z/dtheta_z)^T w``.
Memory and time do not depend on how many iterations the forward solve took:
nothing is backpropagated through them.

Consistency: in training the layers' upkeep (the power iterations of spectrally
normalised maps) runs once, by one training forward of each ``g`` on one sample;
then ``g_x`` and ``g_z`` are evaluated in eval mode throughout -- the solve, the
log-det and the backward -- so all see the same function.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from iresflow.nn.block import ContractionBlock, _one
from iresflow.nn.broyden import BroydenSolver
from iresflow.nn.lipschitz import LIPSCHITZ_LAYERS, LipschitzConv2d
from iresflow.nn.logdet import RussianRouletteLogDet
from iresflow.nn.solvers import SolveInfo
from iresflow.registry import register

__all__ = ["ImplicitBlock"]


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Evaluate ``modules`` in eval mode (no power iterations: fixed weights), then restore."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _independent_copy(g: nn.Module) -> nn.Module:
    """``g``'s architecture with freshly initialised parameters (ImpFlow's ``g_z``).

    Only for residual functions whose bound comes from spectral normalisation
    (every registered one): the re-initialised weights are normalised again.
    """
    maps = [m for m in g.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not maps or not all(isinstance(m, LIPSCHITZ_LAYERS) for m in maps):
        raise ValueError(f"g_z was not given and g ({type(g).__name__}) has linear maps that are not spectrally "
                         "normalised, so a re-initialised copy would not be a contraction: pass g_z explicitly")
    fresh = copy.deepcopy(g)
    for m in fresh.modules():
        if isinstance(m, LIPSCHITZ_LAYERS):
            m.reset_parameters()
    for m in fresh.modules():
        if isinstance(m, LipschitzConv2d) and not m.is_matrix and m.input_size is None:
            continue  # (its norm is estimated at its first forward)
        if isinstance(m, LIPSCHITZ_LAYERS):
            m.power_iteration(m.max_iterations, tol=1e-4)
    return fresh


class _ImplicitSolution(torch.autograd.Function):
    """The solution ``z`` of ``z + g_z(z) = r`` as a function of ``r`` and ``g_z``'s parameters.

    Forward returns the solved ``z``; backward solves ``w + J_gz(z)^T w = grad_z``
    and returns ``w`` for ``r`` and ``-(dg_z/dtheta)^T w`` for the parameters.
    """

    @staticmethod
    def forward(ctx, block: "ImplicitBlock", z: torch.Tensor, rhs: torch.Tensor, *params: torch.Tensor):
        ctx.block = block
        ctx.save_for_backward(z)
        return z.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: torch.Tensor):
        (z,) = ctx.saved_tensors
        w, grads = ctx.block._adjoint(z, grad_z)
        return (None, None, w, *grads)


@register("block", "implicit", description="implicit block z + g_z(z) = x + g_x(x) (ImpFlow): root-finding "
                                           "forward and inverse, log-det difference, implicit gradient")
class ImplicitBlock(ContractionBlock):
    """``z = F(x)`` with ``z + g_z(z) = x + g_x(x)``; both ``g`` Lipschitz-constrained below 1.

    Args:
        g: the residual function of the input side, ``g_x``.
        g_z: the residual function of the output side (same shapes). ``None``: a copy
            of ``g`` with freshly initialised weights (for spectrally normalised ``g``).
        solver: solves ``u + f(u) = y`` for the forward and the inverse (an object with
            ``solve(f, y, x0)``, or a factory of one). Default: Broyden.
        estimator: the log-det estimator, or a factory of one; each of the two terms
            gets its own instance (``estimator_x``, ``estimator_z``). Default: Russian roulette.
        adjoint_solver: solves ``w + J_gz^T w = grad`` in the backward. Default:
            Broyden to a relative tolerance of 1e-6 (the gradient's scale is arbitrary,
            so an absolute tolerance would mean nothing).

    ``last_solve_info`` holds the last forward or inverse solve's report,
    ``last_adjoint_info`` the last backward solve's.
    """

    estimator_names = ("estimator_x", "estimator_z")

    def __init__(self, g: nn.Module, g_z: nn.Module | None = None, solver: Any = None, estimator: Any = None,
                 adjoint_solver: Any = None):
        super().__init__()
        self.g_x = g
        self.g_z = _independent_copy(g) if g_z is None else g_z
        self.solver = BroydenSolver() if solver is None else _one(solver)
        self.adjoint_solver = (BroydenSolver(tol=1e-30, rtol=1e-6) if adjoint_solver is None
                               else _one(adjoint_solver))
        estimator_x = RussianRouletteLogDet() if estimator is None else _one(estimator)
        self.estimator_x = estimator_x
        self.estimator_z = copy.deepcopy(estimator_x)
        self.last_solve_info: SolveInfo | None = None
        self.last_adjoint_info: SolveInfo | None = None

    # -- the map -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._upkeep(x)
        with _eval_mode(self.g_x, self.g_z):
            return self._solve_z(x + self.g_x(x), x)

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det J_F(x)|[B])`` with the log-det as the difference of two estimates."""
        self._upkeep(x)
        with _eval_mode(self.g_x, self.g_z):
            gx, logdet_x = self.estimator_x(self.g_x, x)
            z = self._solve_z(x + gx, x)
            _, logdet_z = self.estimator_z(self.g_z, z)
        return z, logdet_x - logdet_z

    def inverse(self, z: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Solve ``x + g_x(x) = z + g_z(z)`` without grad; the report goes to ``last_solve_info``."""
        with torch.no_grad(), _eval_mode(self.g_x, self.g_z):
            x, info = self.solver.solve(self.g_x, z + self.g_z(z), z if x0 is None else x0)
        self.last_solve_info = info
        return x

    def residual_functions(self) -> list[nn.Module]:
        """``g_x`` and ``g_z`` (both must be contractions; ``lipschitz_bound()`` is the larger bound)."""
        return [self.g_x, self.g_z]

    # -- the pieces ------------------------------------------------------------------
    def _upkeep(self, x: torch.Tensor) -> None:
        """What a training forward of each ``g`` does besides computing (power iterations),
        run once on one sample, before anything uses the weights of this step."""
        if self.training and torch.is_grad_enabled():
            with torch.enable_grad():
                probe = x[:1].detach()
                self.g_x(probe)
                self.g_z(probe)

    def _solve_z(self, rhs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The root ``z`` of ``z + g_z(z) = rhs``, carrying the implicit gradient when one is needed."""
        with torch.no_grad():
            z, info = self.solver.solve(self.g_z, rhs.detach(), x0.detach())
        self.last_solve_info = info
        params = [p for p in self.g_z.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (rhs.requires_grad or params):
            z = _ImplicitSolution.apply(self, z, rhs, *params)
        return z

    def _adjoint(self, z: torch.Tensor, grad_z: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``w`` with ``w + J_gz(z)^T w = grad_z``, and ``-(dg_z/dtheta)^T w`` per parameter."""
        with torch.enable_grad(), _eval_mode(self.g_z):
            leaf = z.detach().requires_grad_()
            gz = self.g_z(leaf)

        def transposed_jacobian(w: torch.Tensor) -> torch.Tensor:  # J_gz(z)^T w, a vjp
            return torch.autograd.grad(gz, leaf, w, retain_graph=True)[0]

        w, info = self.adjoint_solver.solve(transposed_jacobian, grad_z)
        self.last_adjoint_info = info
        params = [p for p in self.g_z.parameters() if p.requires_grad]
        grads = torch.autograd.grad(gz, params, -w, allow_unused=True) if params else ()
        return w, list(grads)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, adjoint_solver={self.adjoint_solver!r}"
