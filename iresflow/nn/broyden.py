"""Limited-memory Broyden: a quasi-Newton root finder for ``x + f(x) = y`` and any ``h(x) = 0``.

Newton's method steps ``x <- x - J_h(x)^{-1} h(x)``; Broyden's "good" method
never forms ``J_h``: it keeps an approximation ``H`` of the inverse Jacobian,
starts from ``H_0 = I`` and after each step ``s = x_new - x`` (with residual
change ``d = h(x_new) - h(x)``) makes it satisfy the secant condition
``H_new d = s`` by the smallest change in the norm that Broyden chose::

    H_new = H + (s - H d) (s^T H) / (s^T H d)

so ``H = I + sum_i a_i b_i^T`` is the identity plus rank-one terms, at most
``memory`` of them per sample; when they are used up the method restarts from
``H = I`` (dropping only the oldest term would leave the others describing a
matrix that no longer exists, and measured, diverges where restarting does not). For
``h(x) = x + f(x) - y``, ``J_h = I + J_f`` and the first step ``-H_0 h`` is the
plain fixed-point step ``x <- y - f(x)``; later steps learn the directions in
which ``f`` contracts slowly, so where ``Lip(f)`` is close to 1 Broyden needs a
small fraction of the fixed-point iteration's evaluations.

Safeguard: Broyden's residuals need not fall at every step, but a trial step
whose residual is non-finite or more than ``growth`` times the best one seen is
not taken (the sample stays where it was); its secant pair is still a true one
and still updates ``H``, so the next step is better informed instead of the
same. The point with the smallest residual is returned. Samples are solved
independently (each its own ``H``) and stop, one by one, once
``rms(h(x_b)) <= tol + rtol * scale_b``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from iresflow.nn.solvers import ConvergenceError, SolveInfo, _Solver
from iresflow.registry import register

__all__ = ["BroydenSolver"]

Function = Callable[[torch.Tensor], torch.Tensor]


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square of a ``[B, D]`` tensor."""
    return t.norm(dim=1) / math.sqrt(t.shape[1])


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


@register("solver", "broyden", description="limited-memory good Broyden (quasi-Newton, per sample): few "
                                          "evaluations where Lip(g) is close to 1; also a root finder h(x) = 0")
class BroydenSolver(_Solver):
    """Limited-memory good Broyden for ``x + f(x) = y`` (:meth:`solve`) or ``h(x) = 0`` (:meth:`root`).

    Args:
        tol: absolute tolerance on each sample's RMS residual.
        rtol: relative tolerance: sample ``b`` has converged when
            ``rms(x_b + f(x_b) - y_b) <= tol + rtol * rms(y_b)``.
        max_iter: the most steps (each one evaluation of ``f``).
        memory: rank-one terms of the inverse-Jacobian approximation kept per sample.
        growth: a trial step whose residual exceeds this times the sample's best
            one is not taken (its secant information is still used).
        strict: raise :class:`~iresflow.nn.solvers.ConvergenceError` instead of warning.
    """

    def __init__(self, tol: float = 1e-6, rtol: float = 0.0, max_iter: int = 100, memory: int = 30,
                 growth: float = 2.0, strict: bool = False):
        super().__init__(tol, max_iter, strict)
        if rtol < 0:
            raise ValueError(f"rtol must be >= 0, got {rtol}")
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if not growth >= 1:
            raise ValueError(f"growth must be >= 1 (a step may not be required to shrink the residual), "
                             f"got {growth}")
        self.rtol = float(rtol)
        self.memory = int(memory)
        self.growth = float(growth)

    # -- the two problem forms ---------------------------------------------------
    def _solve(self, f: Function, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
        return self._broyden(lambda t: t + f(t) - y, x, _rms(y.reshape(y.shape[0], -1)))

    def root(self, h: Function, x0: torch.Tensor, scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``h(x) = 0`` from ``x0`` (no grad): sample ``b`` has converged when
        ``rms(h(x)_b) <= tol + rtol * scale_b`` (``scale``: ``[B]``, default 0).
        Reports like :meth:`solve`: warns when it did not converge, raises when ``strict``."""
        batch = x0.shape[0]
        scale = x0.new_zeros(batch) if scale is None else scale.reshape(batch).to(x0.dtype)
        with torch.no_grad():
            x, info = self._broyden(h, x0.clone(), scale)
        if not info.converged:
            msg = (f"{type(self).__name__} did not converge: residual {info.residual:.3e} > "
                   f"tol {self.tol:.1e} + rtol {self.rtol:.1e} * scale after {info.iterations} iterations "
                   f"({info.evaluations} evaluations)")
            if self.strict:
                raise ConvergenceError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return x, info

    # -- the method -----------------------------------------------------------------
    def _broyden(self, h: Function, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
        shape, batch = x.shape, x.shape[0]
        x = x.reshape(batch, -1)
        # H = I + sum_i a_i b_i^T per sample; all-zero slots contribute nothing.
        memory = min(self.memory, self.max_iter)
        a = x.new_zeros(batch, memory, x.shape[1])
        b = torch.zeros_like(a)

        def apply_h(v: torch.Tensor) -> torch.Tensor:  # H v
            return v + torch.einsum("bmd,bm->bd", a, torch.einsum("bmd,bd->bm", b, v))

        def apply_h_t(v: torch.Tensor) -> torch.Tensor:  # H^T v
            return v + torch.einsum("bmd,bm->bd", b, torch.einsum("bmd,bd->bm", a, v))

        hx = h(x.view(shape)).reshape(batch, -1)
        evaluations, it = 1, 0
        res = _rms(hx)
        best, best_res = x, res  # the point with the smallest residual so far, per sample
        bound = self.tol + self.rtol * scale
        active = ~(res <= bound)  # (a non-finite residual is not converged)
        tiny = torch.finfo(x.dtype).tiny
        slot = 0
        while it < self.max_iter and bool(active.any()) and bool(best_res.isfinite().all()):
            it += 1
            step = torch.where(active[:, None], -apply_h(hx), torch.zeros_like(hx))
            trial = x + step
            h_trial = h(trial.view(shape)).reshape(batch, -1)
            evaluations += 1
            res_trial = _rms(h_trial)

            # Secant update H += (s - H d)(s^T H) / (s^T H d) from every finite trial.
            d = h_trial - hx
            hd = apply_h(d)
            denom = _dot(step, hd)
            # (a vanishing denominator: no usable secant information in this step)
            usable = (active & h_trial.isfinite().all(1)
                      & (denom.abs() > 1e-8 * step.norm(dim=1) * hd.norm(dim=1) + tiny))[:, None]
            if slot == memory:  # memory used up: restart from H = I
                a.zero_()
                b.zero_()
                slot = 0
            a[:, slot] = torch.where(usable, (step - hd) / torch.where(usable, denom[:, None], 1.0), 0.0)
            b[:, slot] = torch.where(usable, apply_h_t(step), 0.0)
            slot += 1

            taken = active & (res_trial <= self.growth * best_res)  # False for a non-finite trial
            x = torch.where(taken[:, None], trial, x)
            hx = torch.where(taken[:, None], h_trial, hx)
            res = torch.where(taken, res_trial, res)
            better = res < best_res
            best = torch.where(better[:, None], x, best)
            best_res = torch.where(better, res, best_res)
            active = ~(best_res <= bound)
        worst = best_res.max().item()
        return best.view(shape), SolveInfo(it, evaluations, worst, bool((best_res <= bound).all()))
