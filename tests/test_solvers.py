"""Inverse solvers: reconstruction, evaluation counts, and non-convergence reporting.

The residual functions are built here (contractive MLPs with weights divided by
their exact spectral norm), so these tests do not depend on iresflow.nn.residual.
"""

import math
import warnings

import pytest
import torch
from torch import nn

from iresflow.nn.solvers import (AndersonSolver, ConvergenceError, FixedPointSolver, SolveInfo,
                                 residual)
from iresflow.registry import build

from helpers import ContractiveMLP

torch.set_num_threads(1)


class SymmetricContraction(nn.Module):
    """``g(x) = c Q^T tanh(Q x)`` with Q orthogonal: J = c Q^T diag(tanh') Q is symmetric with
    eigenvalues in (0, c], close to c near 0 -- the slow case for plain fixed-point iteration
    (a random MLP's Jacobian is usually far less contractive than its bound)."""

    def __init__(self, dim, c, dtype=torch.float64, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=dtype))
        self.register_buffer("q", q)
        self.c = c

    def forward(self, x):
        return self.c * torch.tanh(x @ self.q.T) @ self.q


class Counting(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.g, self.calls = g, 0

    def forward(self, x):
        self.calls += 1
        return self.g(x)


def test_residual_is_worst_sample_rms():
    x = torch.zeros(3, 2, 2)
    fx = torch.zeros(3, 2, 2)
    y = torch.zeros(3, 2, 2)
    y[1] = 2.0  # sample 1: all entries off by 2 -> RMS 2
    y[2, 0, 0] = 3.0  # sample 2: one entry off by 3 -> RMS 3/2
    assert residual(x, fx, y) == pytest.approx(2.0)


@pytest.mark.parametrize("solver_name", ["fixed_point", "anderson"])
@pytest.mark.parametrize("c", [0.5, 0.9])
def test_inverse_reconstructs_float32(solver_name, c):
    g = ContractiveMLP(8, 32, c, dtype=torch.float32)
    x = torch.randn(64, 8)
    y = x + g(x)
    solver = build("solver", solver_name, tol=1e-6)
    x_rec, info = solver.solve(g, y)
    err = (x_rec - x).abs().max().item()
    print(f"{solver_name} c={c}: max|x - F^-1(F(x))| = {err:.2e}, {info}")
    assert isinstance(info, SolveInfo) and info.converged
    assert info.residual <= 1e-6
    assert residual(x_rec, g(x_rec), y) == pytest.approx(info.residual, rel=0.1)  # float32 rounding
    assert err < 1e-5
    assert not x_rec.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anderson_needs_far_fewer_evaluations_at_c_09(dtype):
    g = Counting(SymmetricContraction(16, 0.9, dtype=dtype))
    x = 0.5 * torch.randn(64, 16, dtype=dtype)
    y = x + g(x)
    counts = {}
    for solver in (FixedPointSolver(tol=1e-6, max_iter=2000), AndersonSolver(tol=1e-6)):
        g.calls = 0
        x_rec, info = solver.solve(g, y)
        assert info.converged
        assert info.evaluations == g.calls  # the count is honest
        assert (x_rec - x).abs().max().item() < 1e-4
        counts[type(solver).__name__] = info.evaluations
    ratio = counts["AndersonSolver"] / counts["FixedPointSolver"]
    print(f"{dtype}: evaluations to 1e-6 {counts}, Anderson/fixed-point = {ratio:.3f}")
    assert ratio <= 1 / 3


def test_anderson_fewer_evaluations_rotational_jacobian():
    # J = c Q2 diag(tanh') Q1 with independent orthogonal Q1, Q2: eigenvalues spread around
    # a circle of radius ~c -- the hard case for Anderson (like restarted GMRES); it must
    # still beat the plain iteration.
    gen = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    g = lambda t: 0.9 * torch.tanh(t @ q1.T) @ q2.T  # noqa: E731
    x = 0.5 * torch.randn(64, 16, dtype=torch.float64)
    y = x + g(x)
    _, fp = FixedPointSolver(tol=1e-6).solve(g, y)
    _, aa = AndersonSolver(tol=1e-6).solve(g, y)
    print(f"rotational J, c=0.9: fixed point {fp.evaluations}, Anderson {aa.evaluations} "
          f"(ratio {aa.evaluations / fp.evaluations:.2f})")
    assert fp.converged and aa.converged
    assert aa.evaluations < fp.evaluations


@pytest.mark.parametrize("solver_cls", [FixedPointSolver, AndersonSolver])
def test_non_convergence_warns_and_strict_raises(solver_cls):
    g = SymmetricContraction(8, 0.9)
    x = torch.randn(4, 8, dtype=torch.float64)
    y = x + g(x)
    with pytest.warns(RuntimeWarning, match=r"did not converge: residual .* after 2 iterations"):
        _, info = solver_cls(tol=1e-10, max_iter=2).solve(g, y)
    assert not info.converged and info.iterations == 2 and info.residual > 1e-10
    with pytest.raises(ConvergenceError, match="residual"):
        solver_cls(tol=1e-10, max_iter=2, strict=True).solve(g, y)


@pytest.mark.parametrize("solver_cls", [FixedPointSolver, AndersonSolver])
def test_warm_start_at_solution_costs_one_evaluation(solver_cls):
    g = Counting(ContractiveMLP(4, 8, 0.9, dtype=torch.float64))
    x = torch.randn(5, 4, dtype=torch.float64)
    y = x + g(x)
    g.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_rec, info = solver_cls(tol=1e-9).solve(g, y, x0=x)
    assert info.evaluations == 1 and info.iterations == 0 and info.converged
    assert torch.equal(x_rec, x)


def test_image_shaped_batches_are_solved_per_sample():
    # g acting on [B, C, H, W]; Anderson's least squares is per sample, so one hard
    # sample must not spoil the others' weights.
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        # Operator norm of a conv is at most sum |kernel| per in/out pair bound; a crude
        # safe scaling: divide by the l1 norm of the kernel (Young's inequality).
        conv.weight.mul_(0.9 / conv.weight.abs().sum())
    g = lambda t: torch.tanh(conv(t))  # noqa: E731
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    x[1] *= 10
    y = x + g(x)
    x_rec, info = AndersonSolver(tol=1e-10).solve(g, y)
    assert info.converged and x_rec.shape == x.shape
    assert (x_rec - x).abs().max().item() < 1e-8


def test_bad_arguments_rejected():
    with pytest.raises(ValueError):
        FixedPointSolver(tol=0)
    with pytest.raises(ValueError):
        AndersonSolver(memory=0)
    assert math.isclose(build("solver", "anderson", memory=3).memory, 3)


def test_anderson_survives_samples_that_converge_first():
    """A sample already solved has a zero residual history (a degenerate Gram matrix);
    it must neither fail nor disturb the rest of the batch."""
    from iresflow.nn.solvers import AndersonSolver

    torch.manual_seed(0)
    mask = torch.ones(4, 3, dtype=torch.float64)
    mask[0] = 0.0  # g = 0 on sample 0: x = y from the start

    def g(x):
        return 0.9 * torch.tanh(x[:, [1, 2, 0]]) * mask

    x_true = torch.randn(4, 3, dtype=torch.float64)
    y = x_true + g(x_true)
    x, info = AndersonSolver(tol=1e-10, max_iter=200).solve(g, y)
    assert info.converged
    torch.testing.assert_close(x, x_true, atol=1e-9, rtol=0)


# --------------------------------------------------------------------------- relative tolerance, per sample


class RowCounting(nn.Module):
    """Counts the calls and the rows (samples) it was evaluated on."""

    def __init__(self, g):
        super().__init__()
        self.g, self.calls, self.rows = g, 0, 0

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        return self.g(x)


def _large_output_block():
    """A float32 block whose outputs are about 9 in size (large biases)."""
    g = ContractiveMLP(8, 32, 0.9, dtype=torch.float32)
    with torch.no_grad():
        g.l2.bias.fill_(9.0)
    x = torch.randn(64, 8)
    return g, x, x + g(x)


@pytest.mark.parametrize("solver_cls", [FixedPointSolver, AndersonSolver])
def test_float32_rounding_floor_needs_a_relative_tolerance(solver_cls):
    """At |y| ~ 9 float32 rounds x + g(x) - y to about 5e-7: a smaller absolute tolerance is out
    of reach for the fixed point (the solve stalls and says so); tol + rtol * |y| is reached
    quickly and accurately by both solvers."""
    g, x, y = _large_output_block()
    print(f"rms(y) = {(y.norm(dim=1) / 8 ** 0.5).mean():.1f}")
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, stalled = FixedPointSolver(tol=1e-7, max_iter=300).solve(g, y)
    assert not stalled.converged and stalled.iterations == 300 and stalled.unconverged > 0
    x_rec, info = solver_cls(tol=1e-7, rtol=1e-6, max_iter=300).solve(g, y)
    err = (x_rec - x).abs().max().item()
    print(f"fixed point stalled at residual {stalled.residual:.1e} after 300 iterations; {solver_cls.__name__} "
          f"with rtol 1e-6: {info.iterations} iterations, residual {info.residual:.1e}, max error {err:.1e}")
    assert info.converged and info.iterations < 60
    rms_y = y.norm(dim=1) / 8 ** 0.5
    per_sample = ((x_rec + g(x_rec) - y).norm(dim=1) / 8 ** 0.5)
    assert bool((per_sample <= 1e-7 + 1e-6 * rms_y + 1e-6).all())  # (+ the float32 rounding of this check)
    assert err < 1e-4


@pytest.mark.parametrize("solver_cls", [FixedPointSolver, AndersonSolver])
def test_converged_samples_stop_being_evaluated(solver_cls):
    """Samples are solved independently: easy ones (tanh saturated: g is nearly constant) stop
    after a few evaluations while the hard ones go on, and the answer is what each sample
    gets when solved alone."""
    g = RowCounting(SymmetricContraction(8, 0.9))
    x = 0.3 * torch.randn(16, 8, dtype=torch.float64)
    x[8:] += 40.0  # far out: tanh' ~ 0
    y = x + g.g(x)
    x_rec, info = solver_cls(tol=1e-10).solve(g, y)
    assert info.converged and info.evaluations == g.calls
    assert g.rows == pytest.approx(info.sample_evaluations * 16)
    print(f"{solver_cls.__name__}: {info.evaluations} calls, {info.sample_evaluations:.1f} evaluations per sample")
    assert info.sample_evaluations < 0.7 * info.evaluations
    for b in (0, 9):
        alone, _ = solver_cls(tol=1e-10).solve(g.g, y[b:b + 1])
        torch.testing.assert_close(x_rec[b:b + 1], alone, rtol=0, atol=1e-13)
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver_cls", [FixedPointSolver, AndersonSolver])
def test_a_whole_batch_function_is_evaluated_on_the_whole_batch(solver_cls):
    """A callable that is not a module may act on the batch as a whole (e.g. a vector-Jacobian
    product of a batch's graph, as an implicit block's adjoint solve passes): it always gets
    every sample, the converged ones held fixed, and the answer is the same."""
    g = SymmetricContraction(8, 0.9)
    x = 0.3 * torch.randn(16, 8, dtype=torch.float64)
    x[8:] += 40.0
    y = x + g(x)
    shapes = []

    def whole_batch(t):
        shapes.append(t.shape[0])
        return g(t)

    x_rec, info = solver_cls(tol=1e-10).solve(whole_batch, y)
    assert set(shapes) == {16} and info.sample_evaluations == info.evaluations
    per_sample, _ = solver_cls(tol=1e-10).solve(RowCounting(g), y)
    torch.testing.assert_close(x_rec, per_sample, rtol=0, atol=1e-13)


def test_relative_tolerance_is_validated():
    with pytest.raises(ValueError, match="rtol"):
        FixedPointSolver(rtol=-1.0)
    assert build("solver", "anderson", rtol=1e-5).rtol == 1e-5
