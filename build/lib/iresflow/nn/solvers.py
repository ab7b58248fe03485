"""Inverse solvers for a residual block: find ``x`` with ``x + f(x) = y``.

When ``Lip(f) < 1`` the map ``x -> y - f(x)`` is a contraction, so plain
fixed-point iteration converges like ``Lip(f)^n`` (Banach). Anderson
acceleration mixes the last few iterates to converge in far fewer evaluations
of ``f`` when ``Lip(f)`` is close to 1.

Every solver runs without autograd, checks convergence with the same residual
(:func:`residual`), reports what happened in a :class:`SolveInfo`, warns when it
did not converge and raises :class:`ConvergenceError` when ``strict``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from iresflow.registry import register

__all__ = ["SolveInfo", "ConvergenceError", "residual", "FixedPointSolver", "AndersonSolver"]

Function = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolveInfo:
    """What one solve did: iterations, calls of ``f``, final residual, converged or not.

    ``evaluations`` counts the calls of ``f``; a sample stops being evaluated once it has
    converged, so ``sample_evaluations`` (the mean over samples of the evaluations at that
    sample) measures the work. ``residual`` is the worst sample's RMS residual.
    """

    iterations: int
    evaluations: int
    residual: float
    converged: bool
    sample_evaluations: float = 0.0
    unconverged: int = 0  # samples that did not reach their tolerance


class ConvergenceError(RuntimeError):
    """Raised by a ``strict`` solver that did not reach its tolerance."""


def _per_sample_rms(r: torch.Tensor) -> torch.Tensor:
    r = r.reshape(r.shape[0], -1)
    return r.norm(dim=1) / math.sqrt(r.shape[1])


def residual(x: torch.Tensor, fx: torch.Tensor, y: torch.Tensor) -> float:
    """``max_b ||x_b + f(x_b) - y_b||_2 / sqrt(numel_b)``: RMS per sample, absolute, worst sample."""
    return _per_sample_rms(x + fx - y).max().item()


class _Solver:
    """Shared bookkeeping: tolerances, iteration budget, per-sample convergence, reporting.

    Sample ``b`` has converged when ``rms(x_b + f(x_b) - y_b) <= tol + rtol * rms(y_b)``
    (``tol`` absolute, ``rtol`` relative, as Residual Flows' ``atol``/``rtol``); from then on
    it is no longer iterated. When ``f`` is an ``nn.Module`` (a residual function: it acts
    on each sample alone, as the log-det estimators also rely on) it is no longer
    evaluated there either; any other callable (e.g. a closure over the whole batch) is
    evaluated on the whole batch, the converged samples held fixed. In float32 a
    residual below a few ulps of ``|y|`` cannot be reached: ``rtol`` of about ``1e-6``
    keeps a solve off that rounding floor.
    """

    def __init__(self, tol: float = 1e-6, max_iter: int = 500, strict: bool = False, rtol: float = 0.0):
        if tol <= 0:
            raise ValueError(f"tol must be positive, got {tol}")
        if rtol < 0:
            raise ValueError(f"rtol must be >= 0, got {rtol}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.tol = float(tol)
        self.rtol = float(rtol)
        self.max_iter = int(max_iter)
        self.strict = bool(strict)

    def solve(self, f: Function, y: torch.Tensor, x0: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve ``x + f(x) = y`` (no grad); returns ``(x, SolveInfo)``."""
        with torch.no_grad():
            x, info = self._solve(f, y, y.clone() if x0 is None else x0.clone())
        self._report(info, y.shape[0], scale="rms(y)")
        return x, info

    def _report(self, info: SolveInfo, batch: int, scale: str) -> None:
        """A solve that did not converge: a warning, or :class:`ConvergenceError` when ``strict``
        (``scale``: what ``rtol`` multiplies, for the message)."""
        if info.converged:
            return
        rel = f" + rtol {self.rtol:.1e} x {scale}" if self.rtol else ""
        where = f" on {info.unconverged} of {batch} samples" if info.unconverged else ""
        msg = (f"{type(self).__name__} did not converge: residual {info.residual:.3e} > "
               f"tol {self.tol:.1e}{rel}{where} after {info.iterations} iterations "
               f"({info.evaluations} evaluations)")
        if self.strict:
            raise ConvergenceError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _solve(self, f: Function, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
        raise NotImplementedError

    def _thresholds(self, y_flat: torch.Tensor) -> torch.Tensor:
        """Per sample: ``tol + rtol * rms(y_b)``."""
        if not self.rtol:
            return torch.full((y_flat.shape[0],), self.tol, dtype=y_flat.dtype, device=y_flat.device)
        return self.tol + self.rtol * y_flat.norm(dim=1) / math.sqrt(y_flat.shape[1])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _Progress:
    """The samples still being solved (``active``: their indices) and each sample's last residual."""

    def __init__(self, y_flat: torch.Tensor, thresholds: torch.Tensor, f: Function):
        self.batch = y_flat.shape[0]
        self.by_sample = isinstance(f, nn.Module)
        self.active = torch.arange(self.batch, device=y_flat.device)
        self.thresholds = thresholds
        self.residuals = torch.full((self.batch,), math.inf, dtype=y_flat.dtype, device=y_flat.device)
        self.failed = torch.zeros(self.batch, dtype=torch.bool, device=y_flat.device)
        self.rows_evaluated = 0

    def evaluate(self, f: Function, x_a: torch.Tensor, out: torch.Tensor, shape) -> torch.Tensor:
        """``f`` at the active samples' iterates ``x_a`` (rows of the flat solution ``out``):
        on those rows alone when ``f`` acts per sample, else on the whole batch."""
        if self.by_sample or self.active.numel() == self.batch:
            self.rows_evaluated += x_a.shape[0]
            return f(x_a.view(-1, *shape[1:])).reshape(x_a.shape)
        out[self.active] = x_a
        self.rows_evaluated += self.batch
        return f(out.view(shape)).reshape(out.shape)[self.active]

    def update(self, r: torch.Tensor) -> torch.Tensor:
        """Record the residual rows ``r`` of the active samples; returns the mask of those to keep."""
        rms = r.norm(dim=1) / math.sqrt(r.shape[1])
        self.residuals[self.active] = rms
        finite = torch.isfinite(rms)
        self.failed[self.active[~finite]] = True
        return finite & (rms > self.thresholds[self.active])

    def info(self, iterations: int, evaluations: int) -> SolveInfo:
        unconverged = int(((self.residuals > self.thresholds) | self.failed).sum())
        return SolveInfo(iterations, evaluations, float(self.residuals.max()), unconverged == 0,
                         self.rows_evaluated / self.batch, unconverged)


@register("solver", "fixed_point")
class FixedPointSolver(_Solver):
    """Banach fixed-point iteration ``x <- y - f(x)``; converges like ``Lip(f)^n``."""

    def __init__(self, tol: float = 1e-6, max_iter: int = 500, strict: bool = False, rtol: float = 0.0):
        super().__init__(tol, max_iter, strict, rtol)

    def _solve(self, f, y, x):
        shape = y.shape
        y_flat, out = y.reshape(shape[0], -1), x.reshape(shape[0], -1).clone()
        progress = _Progress(y_flat, self._thresholds(y_flat), f)
        x_a, y_a = out, y_flat  # the active samples' iterates and targets
        evaluations = it = 0
        # Each pass: evaluate f at the current x, test it, then step. The returned
        # residual therefore belongs to the returned x.
        for it in range(self.max_iter + 1):
            fx = progress.evaluate(f, x_a, out, shape)
            evaluations += 1
            step = y_a - fx
            keep = progress.update(x_a - step)
            if it == self.max_iter or not bool(keep.any()):
                break
            if not bool(keep.all()):  # converged samples keep their x; the others go on alone
                done = ~keep
                out[progress.active[done]] = x_a[done]
                progress.active, x_a, y_a, step = progress.active[keep], x_a[keep], y_a[keep], step[keep]
            x_a = step
        if x_a is not out:
            out[progress.active] = x_a
        return out.view(shape), progress.info(it, evaluations)


@register("solver", "anderson")
class AndersonSolver(_Solver):
    """Anderson acceleration (type II) of ``x <- y - f(x)``, solved per sample.

    With fixed-point map ``G(x) = y - f(x)`` and residuals ``F_i = G(x_i) - x_i``
    of the last ``memory`` iterates, each sample takes the weights ``alpha``
    minimising ``||sum_i alpha_i F_i||^2 + lam * s * ||alpha||^2`` subject to
    ``sum_i alpha_i = 1`` and steps to ``sum_i alpha_i (x_i + beta F_i)``.
    The Tikhonov term is scaled by ``s`` = the newest squared residual, so
    ``lam`` is relative and keeps regularising as the residuals shrink (an
    absolute ``lam`` would swamp the system near convergence and turn the
    step into a plain average).
    """

    def __init__(self, tol: float = 1e-6, max_iter: int = 200, memory: int = 5,
                 beta: float = 1.0, lam: float = 1e-4, strict: bool = False, rtol: float = 0.0):
        super().__init__(tol, max_iter, strict, rtol)
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.memory = int(memory)
        self.beta = float(beta)
        self.lam = float(lam)

    def _solve(self, f, y, x):
        shape, batch = y.shape, y.shape[0]
        y_flat = y.reshape(batch, -1)
        dim = y_flat.shape[1]
        # More than dim + 1 residuals in dim dimensions are linearly dependent: the
        # least-squares weights become ill-determined and the steps worse.
        m = min(self.memory, dim + 1)
        progress = _Progress(y_flat, self._thresholds(y_flat), f)
        out = x.reshape(batch, -1).clone()
        # The active samples: iterates, targets and history ring buffers (iterates, residuals).
        x_a, y_a = out, y_flat
        xs = y_flat.new_zeros(batch, m, dim)
        fs = y_flat.new_zeros(batch, m, dim)
        evaluations = it = 0
        for it in range(self.max_iter + 1):
            fx = progress.evaluate(f, x_a, out, shape)
            evaluations += 1
            r = y_a - fx - x_a  # G(x) - x
            keep = progress.update(r)
            if it == self.max_iter or not bool(keep.any()):
                break
            if not bool(keep.all()):
                done = ~keep
                out[progress.active[done]] = x_a[done]
                progress.active = progress.active[keep]
                x_a, y_a, r, xs, fs = x_a[keep], y_a[keep], r[keep], xs[keep], fs[keep]
            slot = it % m
            xs[:, slot] = x_a
            fs[:, slot] = r
            n = min(it + 1, m)
            if n == 1:
                x_a = x_a + self.beta * r
                continue
            F = fs[:, :n]
            H = F @ F.transpose(1, 2)  # [B, n, n] Gram matrix of residuals
            scale = (r * r).sum(1).clamp_min(torch.finfo(r.dtype).tiny)
            H = H + (self.lam * scale)[:, None, None] * torch.eye(n, dtype=H.dtype, device=H.device)
            ones = H.new_ones(H.shape[0], n, 1)
            # solve_ex: an ill-conditioned Gram matrix must not fail the batch; such
            # samples get non-finite weights and take the plain step below.
            z, _ = torch.linalg.solve_ex(H, ones)
            alpha = z / z.sum(1, keepdim=True)  # [B, n, 1], sums to 1
            x_new = (alpha * (xs[:, :n] + self.beta * F)).sum(1)
            bad = ~torch.isfinite(x_new).all(1, keepdim=True)
            x_a = torch.where(bad, x_a + self.beta * r, x_new)
        if x_a is not out:
            out[progress.active] = x_a
        return out.view(shape), progress.info(it, evaluations)
