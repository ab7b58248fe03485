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
``rms(h(x_b)) <= tol + rtol * scale_b``; as for the other solvers
(:class:`iresflow.nn.solvers._Solver`, whose tolerances, reporting and per-sample
bookkeeping this solver shares), a residual function (an ``nn.Module``) is then
evaluated on the samples still being solved only, any other callable on the whole
batch with the converged samples held at their solution.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from iresflow.nn.solvers import SolveInfo, _Solver
from iresflow.registry import register

__all__ = ["BroydenSolver"]

Function = Callable[[torch.Tensor], torch.Tensor]


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square of a ``[B, D]`` tensor."""
    return t.norm(dim=1) / math.sqrt(t.shape[1])


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


class _Residual:
    """``h`` at the rows ``rows`` of the batch: on those rows alone when ``by_sample``, else on the
    whole batch with the other rows at ``fixed`` (their solution). Counts the rows it evaluates."""

    def __init__(self, h: Function, shape: torch.Size, by_sample: bool):
        self.h, self.shape, self.by_sample = h, shape, by_sample
        self.rows_evaluated = 0

    def __call__(self, x_rows: torch.Tensor, rows: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        batch = self.shape[0]
        if self.by_sample or rows.numel() == batch:
            self.rows_evaluated += rows.numel()
            return self.h(x_rows.view(-1, *self.shape[1:]), rows).reshape(x_rows.shape)
        full = fixed.clone()
        full[rows] = x_rows
        self.rows_evaluated += batch
        everything = torch.arange(batch, device=rows.device)
        return self.h(full.view(self.shape), everything).reshape(full.shape)[rows]


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
        super().__init__(tol, max_iter, strict, rtol)
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if not growth >= 1:
            raise ValueError(f"growth must be >= 1 (a step may not be required to shrink the residual), "
                             f"got {growth}")
        self.memory = int(memory)
        self.growth = float(growth)

    # -- the two problem forms ---------------------------------------------------
    def _solve(self, f: Function, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
        y_flat = y.reshape(y.shape[0], -1)

        def h(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # x + f(x) - y at those rows
            return t + f(t) - y[rows]

        return self._broyden(_Residual(h, y.shape, isinstance(f, nn.Module)), x, self._thresholds(y_flat))

    def root(self, h: Function, x0: torch.Tensor, scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``h(x) = 0`` from ``x0`` (no grad; ``h`` is evaluated on the whole batch): sample ``b``
        has converged when ``rms(h(x)_b) <= tol + rtol * scale_b`` (``scale``: ``[B]``, default 0).
        Reports like :meth:`solve`: warns when it did not converge, raises when ``strict``."""
        batch = x0.shape[0]
        scale = x0.new_zeros(batch) if scale is None else scale.reshape(batch).to(x0.dtype)
        residual = _Residual(lambda t, rows: h(t), x0.shape, by_sample=False)
        with torch.no_grad():
            x, info = self._broyden(residual, x0.clone(), self.tol + self.rtol * scale)
        self._report(info, batch, scale="scale")
        return x, info

    # -- the method -----------------------------------------------------------------
    def _broyden(self, h: _Residual, x: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
        shape, batch = x.shape, x.shape[0]
        x = x.reshape(batch, -1).clone()
        # H = I + sum_i a_i b_i^T per sample; all-zero slots contribute nothing.
        memory = min(self.memory, self.max_iter)
        a = x.new_zeros(batch, memory, x.shape[1])
        b = torch.zeros_like(a)
        everything = torch.arange(batch, device=x.device)
        hx = h(x, everything, x)
        evaluations, it = 1, 0
        res = _rms(hx)
        best, best_res = x.clone(), res.clone()  # the point with the smallest residual so far, per sample
        tiny = torch.finfo(x.dtype).tiny
        slot = 0
        while it < self.max_iter:
            # the samples still to solve; one whose residual is not finite stops (reported unconverged)
            rows = (~(best_res <= bound) & best_res.isfinite()).nonzero().flatten()
            if rows.numel() == 0:
                break
            it += 1
            a_r, b_r, x_r, hx_r = a[rows], b[rows], x[rows], hx[rows]

            def apply_h(v: torch.Tensor) -> torch.Tensor:  # H v
                return v + torch.einsum("bmd,bm->bd", a_r, torch.einsum("bmd,bd->bm", b_r, v))

            def apply_h_t(v: torch.Tensor) -> torch.Tensor:  # H^T v
                return v + torch.einsum("bmd,bm->bd", b_r, torch.einsum("bmd,bd->bm", a_r, v))

            step = -apply_h(hx_r)
            trial = x_r + step
            h_trial = h(trial, rows, best)
            evaluations += 1
            res_trial = _rms(h_trial)

            # Secant update H += (s - H d)(s^T H) / (s^T H d) from every finite trial.
            d = h_trial - hx_r
            hd = apply_h(d)
            denom = _dot(step, hd)
            # (a vanishing denominator: no usable secant information in this step)
            usable = (h_trial.isfinite().all(1)
                      & (denom.abs() > 1e-8 * step.norm(dim=1) * hd.norm(dim=1) + tiny))[:, None]
            if slot == memory:  # memory used up: restart from H = I
                a.zero_()
                b.zero_()
                a_r.zero_()
                b_r.zero_()
                slot = 0
            a[rows, slot] = torch.where(usable, (step - hd) / torch.where(usable, denom[:, None], 1.0), 0.0)
            b[rows, slot] = torch.where(usable, apply_h_t(step), 0.0)
            slot += 1

            taken = res_trial <= self.growth * best_res[rows]  # False for a non-finite trial
            x[rows] = torch.where(taken[:, None], trial, x_r)
            hx[rows] = torch.where(taken[:, None], h_trial, hx_r)
            res_r = torch.where(taken, res_trial, res[rows])
            res[rows] = res_r
            better = res_r < best_res[rows]
            best[rows] = torch.where(better[:, None], x[rows], best[rows])
            best_res[rows] = torch.where(better, res_r, best_res[rows])
        unconverged = int((~(best_res <= bound)).sum())
        info = SolveInfo(it, evaluations, best_res.max().item(), unconverged == 0,
                         h.rows_evaluated / batch, unconverged)
        return best.view(shape), info
