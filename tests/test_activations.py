"""Formula-defined activations: every derived piece against autograd of the formula ``f``.

An :class:`ElementwiseActivation` writes ``f``, ``f'`` and ``f''``; the base class derives
the autograd function ``(f, f')``, the fused path's no-graph hooks and ``max_slope``.
The references are autograd derivatives of ``f`` itself (float64), never the code's own
derivative formulas; the plugin ``tanh`` (``registry/tanh.py``) is checked through every
fast log-det path against plain autograd.
"""

import pytest
import torch

from iresflow import registry
from iresflow.nn.activations import ElementwiseActivation, LipSwish, _ValueAndSlope
from iresflow.nn.logdet import Hutchinson, PowerSeriesLogDet
from iresflow.nn.lipschitz import update_lipschitz
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.registry import factory

from helpers import Opaque, logdet_and_grads

DT = torch.float64
SMOOTH = ["elu", "lipswish", "softplus", "tanh"]
ELEMENTWISE = SMOOTH + ["relu", "identity"]


def _act(name):
    act = registry.build("activation", name).double()
    assert isinstance(act, ElementwiseActivation)
    return act


def _grid(n=4001, lo=-6.0, hi=6.0):
    x = torch.linspace(lo, hi, n, dtype=DT)
    return x[(x.abs() > 1e-3)].view(-1, 1)  # off the kinks of ELU and ReLU


def _autograd_slopes(act, x):
    """f' and f'' of ``act``'s formula by autograd."""
    x = x.clone().requires_grad_()
    (d,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d.sum(), x, allow_unused=True) if d.requires_grad else (None,)
    return d.detach(), (torch.zeros_like(x) if d2 is None else d2)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_formulas_match_autograd_of_f(name):
    act = _act(name)
    x = _grid()
    theta = act.formula_parameters()
    d_ref, d2_ref = _autograd_slopes(act, x)
    torch.testing.assert_close(_dense(act.df(x, *theta), x, 1.0), d_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_dense(act.d2f(x, *theta), x, 0.0), d2_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the hooks compute the same numbers without a graph
        y, d, d2 = act.value_slope_curvature(x, *theta)
        torch.testing.assert_close(y, act(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_dense(d, x, 1.0), d_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_dense(d2, x, 0.0), d2_ref, rtol=1e-10, atol=1e-12)
        y2, d = act.value_and_slope(x, *theta)
        torch.testing.assert_close(y2, act(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_dense(d, x, 1.0), d_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(act.value(x, *theta), act(x), rtol=1e-12, atol=1e-12)


def _dense(t, like, fill):
    """``None`` (the documented constant 1 for f', 0 for f'') as a tensor."""
    return torch.full_like(like, fill) if t is None else t


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_vjp_hook_matches_autograd(name):
    act = _act(name)
    torch.manual_seed(0)
    x = _grid(401).view(-1, 4)
    grad_y = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    theta = act.formula_parameters()
    params = [p for p in act.parameters()]
    ref = torch.autograd.grad((grad_y * act(xr)).sum(), [xr, *params])
    with torch.no_grad():
        grad_x, grad_theta = act.vjp(x, tuple(t.detach() for t in theta), grad_y)
    torch.testing.assert_close(grad_x, ref[0], rtol=1e-12, atol=1e-12)
    if params:  # LipSwish: d/d raw_beta = d/d beta * sigmoid(raw_beta)
        chain = torch.sigmoid(act.raw_beta.detach())
        torch.testing.assert_close(grad_theta[0] * chain, ref[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SMOOTH)
def test_derived_autograd_function_is_twice_differentiable(name):
    act = _act(name)
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    theta = [t.detach().clone().requires_grad_() for t in act.formula_parameters()]

    def value_and_slope(x, *theta):
        return _ValueAndSlope.apply(act, x, *theta)

    assert torch.autograd.gradcheck(value_and_slope, (x, *theta))
    assert torch.autograd.gradgradcheck(value_and_slope, (x, *theta))


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_declared_lipschitz_constant_holds(name):
    act = _act(name)
    slope = act.max_slope()
    print(f"{name}: max |f'| = {slope:.6f} (declared {act.lipschitz})")
    assert slope <= act.lipschitz + 1e-12


def test_max_slope_catches_a_wrong_constant():
    class Steep(ElementwiseActivation):
        lipschitz = 1.0

        def f(self, x):
            return 2.0 * torch.tanh(x)

        def df(self, x):
            return 2.0 * (1.0 - torch.tanh(x) ** 2)

        def d2f(self, x):
            t = torch.tanh(x)
            return -4.0 * t * (1.0 - t * t)

    assert Steep().max_slope() == pytest.approx(2.0, rel=1e-9)


# --------------------------------------------------------------------------- the plugin's fast paths


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("mode", ["backprop", "neumann", "memory_efficient"])
def test_plugin_activation_fast_paths_equal_autograd(kind, mode):
    torch.manual_seed(0)
    act = factory("activation", "tanh")
    if kind == "mlp":
        g, x = MLPResidual(3, (12, 12), activation=act, coeff=0.9, n_iterations=0, preact=True), torch.randn(4, 3)
    else:
        g, x = ConvResidual(2, (5, 5), 3, activation=act, coeff=0.9, n_iterations=0), torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        for m in g.modules():
            if hasattr(m, "weight_for"):
                m.weight.mul_(3.0)
    update_lipschitz(g, n_iterations=20)
    g, x = g.double(), x.double()
    assert g.linear_chain() is not None  # the plugin keeps g a chain: the fast paths apply
    est = PowerSeriesLogDet(n_terms=4, trace=Hutchinson(n_probes=2), gradient=mode)
    for weights in (torch.ones(x.shape[0], dtype=DT), torch.rand(x.shape[0], dtype=DT)):
        fast = logdet_and_grads(est, g, x, weights, seed=1)
        ref = logdet_and_grads(est, Opaque(g), x, weights, seed=1)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_lipswish_hooks_share_work_and_stay_exact():
    """LipSwish overrides the hooks (silu / silu_backward): same numbers as its formulas."""
    act = LipSwish(beta=0.7).double()
    x = _grid(801).view(-1, 8)
    beta = act.beta.detach()
    with torch.no_grad():
        y, d, d2 = act.value_slope_curvature(x, beta)
        torch.testing.assert_close(y, act.f(x, beta), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(d, act.df(x, beta), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(d2, act.d2f(x, beta), rtol=1e-12, atol=1e-14)

