"""Broyden solver: convergence to tolerance, honest reporting, per-sample tolerances, and fewer
evaluations than the fixed-point iteration where Lip(g) is close to 1.

The residual functions are built here (orthogonal maps and tanh, with exactly known
Lipschitz constants), independent of iresflow.nn.residual; residuals are recomputed from
the returned point, never read from the solver's report alone.
"""

import warnings

import pytest
import torch
from torch import nn

from iresflow.nn.broyden import BroydenSolver
from iresflow.nn.solvers import ConvergenceError, FixedPointSolver, SolveInfo
from iresflow.registry import build

from helpers import ContractiveMLP


def _orthogonal(dim, dtype, gen):
    return torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=dtype))[0]


class Contraction(nn.Module):
    """``g(x) = c Q2 tanh(Q1 x)``, ``Lip(g) = c``. ``Q2 = Q1^T`` (symmetric): J has eigenvalues in
    (0, c], slow for the fixed-point iteration near 0; independent ``Q1, Q2`` (rotational): the
    eigenvalues spread around a circle of radius ~c. Counts its calls."""

    def __init__(self, dim, c, dtype=torch.float64, symmetric=True, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q1 = _orthogonal(dim, dtype, gen)
        q2 = q1.T.clone() if symmetric else _orthogonal(dim, dtype, gen)
        self.register_buffer("q1", q1)
        self.register_buffer("q2", q2)
        self.c, self.calls = c, 0

    def forward(self, x):
        self.calls += 1
        return self.c * torch.tanh(x @ self.q1.T) @ self.q2.T


def _rms(t):
    t = t.reshape(t.shape[0], -1)
    return t.norm(dim=1) / t.shape[1] ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("g_kind", ["mlp", "symmetric", "rotational"])
def test_solves_contractive_blocks_to_tolerance(dtype, g_kind):
    c = 0.9 if g_kind == "mlp" else 0.97
    g = (ContractiveMLP(8, 32, c, dtype=dtype) if g_kind == "mlp"
         else Contraction(16, c, dtype=dtype, symmetric=g_kind == "symmetric"))
    x = torch.randn(64, g.q1.shape[0] if g_kind != "mlp" else 8, dtype=dtype)
    y = x + g(x)
    x_rec, info = BroydenSolver(tol=1e-6).solve(g, y)
    assert isinstance(info, SolveInfo) and info.converged and not x_rec.requires_grad
    res = _rms(x_rec + g(x_rec) - y)  # recomputed, not the solver's number
    slack = 1.0 if dtype == torch.float64 else 1.5  # float32 rounding of the recomputation
    assert res.max().item() <= 1e-6 * slack
    assert info.residual == pytest.approx(res.max().item(), rel=0.3 if dtype == torch.float32 else 1e-6)
    # Banach: ||h(x) - h(x*)|| >= (1 - c) ||x - x*||, so the error is at most residual / (1 - c).
    err = _rms(x_rec - x)
    assert (err <= res / (1 - c) + (1e-6 if dtype == torch.float32 else 1e-12)).all()
    print(f"{g_kind} {dtype}: {info}, max error {err.max().item():.1e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fewer_evaluations_than_fixed_point_near_c_097(dtype, symmetric):
    g = Contraction(16, 0.97, dtype=dtype, symmetric=symmetric)
    x = 0.5 * torch.randn(64, 16, dtype=dtype)
    y = x + g(x)
    counts = {}
    for solver in (FixedPointSolver(tol=1e-6, max_iter=5000), BroydenSolver(tol=1e-6)):
        g.calls = 0
        x_rec, info = solver.solve(g, y)
        assert info.converged
        assert info.evaluations == g.calls  # the count is honest
        assert _rms(x_rec - x).max().item() <= 1e-6 / (1 - 0.97) * 1.5
        counts[type(solver).__name__] = info.evaluations
    ratio = counts["BroydenSolver"] / counts["FixedPointSolver"]
    print(f"c=0.97 {'symmetric' if symmetric else 'rotational'} J, {dtype}: evaluations to 1e-6 {counts}, "
          f"Broyden/fixed point = {ratio:.3f}")
    assert ratio <= (1 / 10 if symmetric else 1 / 2)


@pytest.mark.parametrize("strict", [False, True])
def test_non_convergence_is_reported(strict):
    g = Contraction(8, 0.97)
    y = torch.randn(4, 8, dtype=torch.float64)
    solver = BroydenSolver(tol=1e-12, max_iter=2, strict=strict)
    if strict:
        with pytest.raises(ConvergenceError, match="did not converge: residual"):
            solver.solve(g, y)
        return
    with pytest.warns(RuntimeWarning, match=r"did not converge: residual .* after 2 iterations \(3 evaluations\)"):
        x, info = solver.solve(g, y)
    assert not info.converged and info.iterations == 2 and info.evaluations == 3
    assert info.residual == pytest.approx(_rms(x + g(x) - y).max().item(), rel=1e-9)
    assert info.residual > 1e-12


def test_non_finite_residual_stops_and_is_reported():
    def g(x):
        out = 0.5 * torch.tanh(x)
        out[1] = float("nan")
        return out

    y = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        x, info = BroydenSolver(tol=1e-8, max_iter=50).solve(g, y)
    assert not info.converged and info.unconverged == 1  # only the poisoned sample
    # the others are solved as if alone: x + g(x) = y to the tolerance
    for i in (0, 2):
        assert _rms(x[i:i + 1] + 0.5 * torch.tanh(x[i:i + 1]) - y[i:i + 1]).item() <= 1e-8


def test_relative_tolerance_is_per_sample():
    """rms(x_b + g(x_b) - y_b) <= tol + rtol * rms(y_b) for each sample, at scales 1e-3 ... 1e3."""
    g = Contraction(8, 0.9)
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64) * scales[:, None]
    y = x + g(x)
    x_rec, info = BroydenSolver(tol=1e-300, rtol=1e-9).solve(g, y)
    assert info.converged
    res = _rms(x_rec + g(x_rec) - y)
    assert (res <= 1e-300 + 1e-9 * _rms(y)).all()
    assert res[0] < 1e-11  # an absolute tolerance fit for sample 2 would have left sample 0 unsolved


def test_generic_root_finder_beyond_contractions():
    """``h(x) = A x + 0.3 sin(x) - b`` with eigenvalues of A in [1, 4]: the plain step x - h(x)
    diverges (|1 - 4| > 1), Broyden's secant updates learn the scale. Reference: Newton's
    method with the exact (autograd) Jacobian."""
    gen = torch.Generator().manual_seed(3)
    dim, batch = 6, 5
    q = _orthogonal(dim, torch.float64, gen)
    a = q @ torch.diag(torch.linspace(1.0, 4.0, dim, dtype=torch.float64)) @ q.T
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64)

    def h(x):
        return x @ a.T + 0.3 * torch.sin(x) - b

    root, info = BroydenSolver(tol=1e-12, max_iter=200).root(h, torch.zeros(batch, dim, dtype=torch.float64))
    assert info.converged and _rms(h(root)).max().item() <= 1e-12
    newton = torch.zeros(batch, dim, dtype=torch.float64)
    for _ in range(30):
        jac = torch.stack([torch.autograd.functional.jacobian(lambda t: h(t[None])[0] + b[i] - b[0], newton[i])
                           for i in range(batch)])
        newton = newton - torch.linalg.solve(jac, h(newton))
    torch.testing.assert_close(root, newton, atol=1e-10, rtol=0)
    print(f"root finder: {info}")


def test_converged_samples_are_not_moved():
    """Sample 0 has g = 0 (solved at the start); it must stay exactly there while the others iterate."""
    mask = torch.ones(4, 8, dtype=torch.float64)
    mask[0] = 0.0
    inner = Contraction(8, 0.97)

    def g(x):
        return inner(x) * mask

    y = torch.randn(4, 8, dtype=torch.float64)
    x, info = BroydenSolver(tol=1e-10).solve(g, y)
    assert info.converged and info.iterations > 3
    assert torch.equal(x[0], y[0])
    assert _rms(x + g(x) - y).max().item() <= 1e-10


def test_warm_start_at_solution_costs_one_evaluation():
    g = Contraction(4, 0.9)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = x + g(x)
    g.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_rec, info = BroydenSolver(tol=1e-9).solve(g, y, x0=x)
    assert info.evaluations == 1 == g.calls and info.iterations == 0 and info.converged
    assert torch.equal(x_rec, x)


def test_image_shaped_batches_and_small_memory():
    """[B, C, H, W] inputs are solved per sample; a memory smaller than the iterations restarts."""
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.mul_(0.95 / conv.weight.abs().sum())  # Young's inequality: operator norm <= l1 norm
    g = lambda t: torch.tanh(conv(t))  # noqa: E731
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    x[1] *= 10
    y = x + g(x)
    for memory in (3, 30):
        x_rec, info = BroydenSolver(tol=1e-10, memory=memory).solve(g, y)
        assert info.converged and x_rec.shape == x.shape
        assert (x_rec - x).abs().max().item() < 1e-8


def test_settings_are_validated_and_registered():
    solver = build("solver", "broyden", tol=1e-7, rtol=1e-4, memory=5, max_iter=20)
    assert isinstance(solver, BroydenSolver)
    assert (solver.tol, solver.rtol, solver.memory, solver.max_iter) == (1e-7, 1e-4, 5, 20)
    for bad in (dict(tol=0), dict(rtol=-1), dict(memory=0), dict(growth=0.5), dict(max_iter=0)):
        with pytest.raises(ValueError):
            BroydenSolver(**bad)


class _RowCounter(nn.Module):
    """A per-sample residual function that records how many rows each call sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.inner(x)


def test_a_module_is_evaluated_only_on_the_samples_still_being_solved():
    """As for the other solvers (iresflow.nn.solvers): samples stop one by one; a residual function
    (an nn.Module) is then evaluated on the rest only, and SolveInfo.sample_evaluations counts it."""
    inner = Contraction(8, 0.97)
    y = torch.randn(6, 8, dtype=torch.float64)
    y[:3] *= 1e-3  # these converge in far fewer steps
    g = _RowCounter(inner)
    x, info = BroydenSolver(tol=1e-10).solve(g, y)
    assert info.converged and info.unconverged == 0
    assert _rms(x + inner(x) - y).max().item() <= 1e-10
    assert min(g.rows) < 6 and g.rows[0] == 6
    assert info.sample_evaluations == pytest.approx(sum(g.rows) / 6) and info.sample_evaluations < info.evaluations
    calls = []

    def closure(t):  # not a module: always the whole batch, the converged samples held at their solution
        calls.append(t.shape[0])
        return inner(t)

    x2, info2 = BroydenSolver(tol=1e-10).solve(closure, y)
    assert set(calls) == {6} and info2.sample_evaluations == info2.evaluations
    torch.testing.assert_close(x2, x, atol=1e-9, rtol=0)
