"""Implicit blocks z + g_z(z) = x + g_x(x): forward, inverse, log-det and the implicit gradient.

References are independent of the block's own machinery: a long unrolled fixed-point
iteration ``z <- x + g_x(x) - g_z(z)`` differentiated by plain autograd (its Jacobian and its
gradients), and ``torch.linalg.slogdet`` of that materialised Jacobian.
"""

import copy

import pytest
import torch

from iresflow import registry
from iresflow.nn.block import InvertibleResidualBlock
from iresflow.nn.broyden import BroydenSolver
from iresflow.nn.dense import DenseConvResidual
from iresflow.nn.implicit import ImplicitBlock
from iresflow.nn.lipschitz import LIPSCHITZ_LAYERS, update_lipschitz
from iresflow.nn.logdet import ExactLogDet, PowerSeriesLogDet
from iresflow.nn.residual import MLPResidual
from iresflow.nn.solvers import ConvergenceError, FixedPointSolver
from iresflow.registry import factory

from helpers import ContractiveMLP

DT = torch.float64


class BasisPowerSeries(PowerSeriesLogDet):
    """The power series with the scaled basis ``sqrt(D) e_j`` as Hutchinson probes: the traces are
    exact, so the estimate is the truncated series itself (deterministic, error ~ Lip^(n+1))."""

    def forward(self, g, x, probes=None):
        d = x[0].numel()
        eye = torch.eye(d, dtype=x.dtype) * d ** 0.5
        return super().forward(g, x, eye[:, None, :].expand(d, x.shape[0], d).reshape(d, *x.shape))


def make_block(dim=4, c=0.7, dtype=DT, estimator=None, tight=True, **kw):
    g_x = ContractiveMLP(dim, 12, c, dtype=dtype, seed=0)
    g_z = ContractiveMLP(dim, 12, c, dtype=dtype, seed=1)
    if tight:
        kw.setdefault("solver", BroydenSolver(tol=1e-14, max_iter=200))
        kw.setdefault("adjoint_solver", BroydenSolver(tol=1e-30, rtol=1e-14, max_iter=200))
    return ImplicitBlock(g_x, g_z, estimator=estimator or ExactLogDet(), **kw)


def unrolled(block, x, n=200):
    """``z`` by ``n`` plain fixed-point steps, every one recorded by autograd."""
    rhs = x + block.g_x(x)
    z = x
    for _ in range(n):
        z = rhs - block.g_z(z)
    return z


def per_sample_jacobian(fn, x, create_graph=False, vectorize=True):
    """``[B, D, D]`` Jacobians of a per-sample map (the batch is independent)."""
    jac = torch.autograd.functional.jacobian(lambda t: fn(t).sum(0), x, create_graph=create_graph,
                                             vectorize=vectorize)
    return jac.permute(1, 0, 2)


def test_forward_and_inverse_float32():
    block = make_block(dim=6, c=0.9, dtype=torch.float32, tight=False)  # the defaults: Broyden to 1e-6
    reference = copy.deepcopy(block).double()
    x = torch.randn(32, 6)
    with torch.no_grad():
        z = block(x)
        z_ref = unrolled(reference, x.double(), n=400)
    assert block.last_solve_info.converged
    forward_err = (z.double() - z_ref).abs().max().item()
    x_rec = block.inverse(z)
    inverse_err = (x_rec - x).abs().max().item()
    print(f"float32 c=0.9: forward error {forward_err:.1e}, inverse error {inverse_err:.1e}, "
          f"{block.last_solve_info}")
    assert block.last_solve_info.converged
    assert forward_err < 1e-5 and inverse_err < 1e-5


def test_forward_and_inverse_float64():
    block = make_block(dim=6, c=0.9)
    x = torch.randn(16, 6, dtype=DT)
    with torch.no_grad():
        z = block(x)
        z_ref = unrolled(block, x, n=600)
    x_rec = block.inverse(z)
    forward_err, inverse_err = (z - z_ref).abs().max().item(), (x_rec - x).abs().max().item()
    print(f"float64 c=0.9: forward error {forward_err:.1e}, inverse error {inverse_err:.1e}")
    assert forward_err < 1e-12 and inverse_err < 1e-12


def test_exact_logdet_matches_slogdet_of_the_whole_map():
    block = make_block()
    x = torch.randn(5, 4, dtype=DT)
    _, logdet = block.forward_and_logdet(x)
    jac = per_sample_jacobian(lambda t: unrolled(block, t), x)
    ref = torch.linalg.slogdet(jac).logabsdet
    err = (logdet - ref).abs().max().item()
    print(f"exact log-det vs slogdet of dz/dx: max error {err:.1e}")
    assert err < 1e-11
    # The Jacobian through the block (its implicit gradient) is the unrolled one.
    jac_block = per_sample_jacobian(block, x, vectorize=False)  # (a solve per row: no vmap)
    torch.testing.assert_close(jac_block, jac, atol=1e-11, rtol=0)


@pytest.mark.parametrize("n_terms", [8, 40])
def test_series_logdet_within_its_truncation_error(n_terms):
    c, dim = 0.7, 4
    block = make_block(dim=dim, c=c, estimator=BasisPowerSeries(n_terms=n_terms))
    x = torch.randn(5, dim, dtype=DT)
    with torch.no_grad():
        z, logdet = block.forward_and_logdet(x)
    ref = torch.linalg.slogdet(per_sample_jacobian(lambda t: unrolled(block, t), x)).logabsdet
    # |sum_{k>n} (-1)^(k+1) tr(J^k)/k| <= D c^(n+1) / ((n+1)(1-c)), for each of the two terms.
    bound = 2 * dim * c ** (n_terms + 1) / ((n_terms + 1) * (1 - c))
    err = (logdet - ref).abs().max().item()
    print(f"power series, {n_terms} terms: error {err:.1e} <= bound {bound:.1e}")
    assert err <= bound

    # And it is exactly the truncated series of the two materialised Jacobians, J_gx(x) and J_gz(z).
    def series(jac):
        power, total = torch.eye(dim, dtype=DT).expand_as(jac), 0.0
        for k in range(1, n_terms + 1):
            power = power @ jac
            total = total + (-1) ** (k + 1) * torch.diagonal(power, dim1=1, dim2=2).sum(1) / k
        return total

    expected = series(per_sample_jacobian(block.g_x, x)) - series(per_sample_jacobian(block.g_z, z))
    torch.testing.assert_close(logdet, expected, atol=1e-13, rtol=0)


def _loss(z, logdet, a, b):
    return (a * z).sum() + 0.1 * (z ** 2).sum() + (b * logdet).sum()


def _gradients(block, x, estimator_logdet):
    x = x.clone().requires_grad_()
    z, logdet = estimator_logdet(block, x)
    params = [p for p in block.parameters() if p.requires_grad]
    torch.manual_seed(5)
    a, b = torch.randn_like(z), torch.randn(z.shape[0], dtype=z.dtype)
    loss = _loss(z, logdet, a, b)
    return torch.autograd.grad(loss, [x, *params])


def _reference_gradients(block, x):
    """Autograd through 200 unrolled steps; the log-det from slogdet of their materialised Jacobian."""

    def forward(blk, t):
        z = unrolled(blk, t)
        jac = per_sample_jacobian(lambda s: unrolled(blk, s), t, create_graph=True)
        return z, torch.linalg.slogdet(jac).logabsdet

    return _gradients(block, x, forward)


def _relative_error(grads, refs):
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, refs))


def test_implicit_gradient_matches_autograd_through_an_unrolled_solve():
    block = make_block()
    x = torch.randn(3, 4, dtype=DT)
    grads = _gradients(block, x, lambda blk, t: blk.forward_and_logdet(t))
    refs = _reference_gradients(block, x)
    assert len(grads) == 1 + sum(1 for _ in block.parameters())  # x and every parameter of g_x and g_z
    assert all(r.abs().max() > 0 for r in refs)
    err = _relative_error(grads, refs)
    print(f"implicit gradient vs unrolled autograd: max relative error {err:.1e}, "
          f"adjoint solve {block.last_adjoint_info}")
    assert err < 1e-8
    assert block.last_adjoint_info.converged


@pytest.mark.parametrize("gradient", ["backprop", "neumann", "memory_efficient"])
def test_gradient_modes_of_the_estimators(gradient):
    """With exact traces and 40 terms at c = 0.5 every gradient mode gives the exact gradient."""
    block = make_block(c=0.5, estimator=BasisPowerSeries(n_terms=40, gradient=gradient))
    x = torch.randn(3, 4, dtype=DT)
    grads = _gradients(block, x, lambda blk, t: blk.forward_and_logdet(t))
    reference = make_block(c=0.5)  # same weights (seeded), exact log-det
    refs = _gradients(reference, x, lambda blk, t: blk.forward_and_logdet(t))
    err = _relative_error(grads, refs)
    print(f"{gradient}: relative error vs the exact log-det's gradient {err:.1e}")
    assert err < 1e-9


def test_solves_see_fixed_weights_and_training_upkeep_runs_once():
    """In training, the normalised maps' power iterations run once (one training forward of each g
    on one sample); the solve, the log-det and the backward then evaluate g in eval mode, so the
    returned z solves the equation for the weights the log-det used."""
    torch.manual_seed(0)
    g_x, g_z = (MLPResidual(3, hidden=(16,), coeff=0.9, n_iterations=1).double() for _ in range(2))
    for g in (g_x, g_z):
        with torch.no_grad():
            for m in g.modules():
                if isinstance(m, LIPSCHITZ_LAYERS):
                    m.weight.mul_(10.0)  # normalisation active, vectors stale: each iteration moves sigma
    block = ImplicitBlock(g_x, g_z, solver=BroydenSolver(tol=1e-12), estimator=ExactLogDet()).train()
    layer = g_z.net[0]
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    x = torch.randn(4, 3, dtype=DT)
    sigma_before = layer.sigma.clone()
    z, logdet = block.forward_and_logdet(x)
    _loss(z, logdet, torch.ones_like(z), torch.ones(4, dtype=DT)).backward()
    handle.remove()
    assert seen[0] is True and not any(seen[1:]) and len(seen) > 3  # upkeep, then eval only
    assert g_x.training and g_z.training  # restored
    assert not torch.equal(layer.sigma, sigma_before)  # the upkeep iterated
    with torch.no_grad():
        g_x.eval(), g_z.eval()
        residual = (z + g_z(z) - x - g_x(x)).abs().max().item()
    assert residual < 1e-11
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("strict", [False, True])
def test_adjoint_non_convergence_is_reported(strict):
    block = make_block(adjoint_solver=BroydenSolver(tol=1e-30, rtol=1e-14, max_iter=1, strict=strict))
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    z, logdet = block.forward_and_logdet(x)
    if strict:
        with pytest.raises(ConvergenceError, match="did not converge"):
            (z.sum() + logdet.sum()).backward()
        return
    with pytest.warns(RuntimeWarning, match="did not converge"):
        (z.sum() + logdet.sum()).backward()
    assert not block.last_adjoint_info.converged and block.last_adjoint_info.iterations == 1


def test_dense_conv_functions_in_an_implicit_block():
    """Real image residual functions (i-DenseNet convs, g_z an independent copy): round trip and
    exact log-det against slogdet of the unrolled map's Jacobian."""
    torch.manual_seed(0)
    g = DenseConvResidual(2, input_size=(3, 3), depth=2, growth=4, coeff=0.8).double()
    block = ImplicitBlock(g, solver=BroydenSolver(tol=1e-13, max_iter=200), estimator=ExactLogDet()).eval()
    assert block.g_z is not g and not torch.equal(block.g_z.net[0].linear.weight, g.net[0].linear.weight)
    x = torch.randn(2, 2, 3, 3, dtype=DT)
    z, logdet = block.forward_and_logdet(x)
    assert (block.inverse(z) - x).abs().max().item() < 1e-11
    jac = per_sample_jacobian(lambda t: unrolled(block, t.view(-1, 2, 3, 3), n=300).flatten(1), x.flatten(1))
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-10, rtol=0)
    assert block.lipschitz_bound() < 0.8 ** 3


def test_registered_block_kinds_and_their_components():
    assert {"residual", "implicit"} <= set(registry.available("block"))
    g = MLPResidual(3, hidden=(8,), coeff=0.9)
    residual = registry.build("block", "residual", g=g, solver="broyden", estimator="exact")
    assert isinstance(residual, InvertibleResidualBlock) and isinstance(residual.solver, BroydenSolver)
    implicit = registry.build("block", "implicit", g=g, solver={"name": "anderson", "tol": 1e-8},
                              estimator={"name": "power_series", "n_terms": 3},
                              adjoint_solver={"name": "fixed_point", "tol": 1e-9})
    assert isinstance(implicit, ImplicitBlock) and implicit.solver.tol == 1e-8
    assert isinstance(implicit.adjoint_solver, FixedPointSolver)
    assert implicit.estimator_x is not implicit.estimator_z and implicit.estimator_z.n_terms == 3
    # The default g_z: the same architecture, its own weights, normalised.
    update_lipschitz(implicit, n_iterations=200)
    assert implicit.g_z.net[0].weight.shape == g.net[0].weight.shape
    assert not torch.equal(implicit.g_z.net[0].weight, g.net[0].weight)
    assert implicit.lipschitz_bound() <= 0.9 ** 2 * (1 + 1e-6)
    names = {n for n, _ in implicit.named_parameters()}
    assert names == {f"g_x.{n}" for n, _ in g.named_parameters()} | {f"g_z.{n}" for n, _ in g.named_parameters()}
    with pytest.raises(ValueError, match="pass g_z explicitly"):
        ImplicitBlock(ContractiveMLP(3, 8, 0.9))  # not spectrally normalised: a copy is no contraction
    block = registry.build("block", "implicit", g=ContractiveMLP(3, 8, 0.9), g_z=ContractiveMLP(3, 8, 0.9, seed=1),
                           solver=factory("solver", "broyden"))
    assert isinstance(block.solver, BroydenSolver)
