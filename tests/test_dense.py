"""i-DenseNet residual functions: the certified Lipschitz bound against materialised Jacobians
(random and adversarial), its tightness, the width bookkeeping, the frozen concatenation
weights, and residual blocks built from them (inverse, log-det against slogdet).

The reference for Lip(g) is the largest singular value of the materialised Jacobian
(``torch.autograd.functional.jacobian``, float64), never the code's own estimate.
"""

import math

import pytest
import torch

from iresflow import registry
from iresflow.nn.activations import CLipSwish
from iresflow.nn.block import InvertibleResidualBlock
from iresflow.nn.broyden import BroydenSolver
from iresflow.nn.dense import DenseConvResidual, DenseLayer, DenseMLPResidual
from iresflow.nn.lipschitz import LIPSCHITZ_LAYERS, update_lipschitz
from iresflow.nn.logdet import ExactLogDet, PowerSeriesLogDet
from iresflow.registry import factory

DT = torch.float64


def _build(kind, activation="clipswish", coeff=0.9, depth=2, growth=4, **kw):
    act = factory("activation", activation)
    if kind == "mlp":
        return DenseMLPResidual(3, depth=depth, growth=growth, activation=act, coeff=coeff, **kw).double()
    return DenseConvResidual(2, input_size=(3, 3), depth=depth, growth=growth, activation=act, coeff=coeff,
                             **kw).double()


def _inflate(g, factor=10.0):
    """Weights far above their bound (the normalisation active), norms re-estimated to convergence."""
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, LIPSCHITZ_LAYERS):
                m.weight.mul_(factor)
    update_lipschitz(g, n_iterations=1500)
    g.eval()
    return g


def _set_angles(g, angles):
    with torch.no_grad():
        for layer, a in zip(g.net[:-1], angles):
            layer.angle.fill_(a)


def _jacobian(g, x):
    """``[B, D_out, D_in]`` per-sample Jacobians of ``g`` at ``x``."""
    flat = lambda t: g(t.view(-1, *x.shape[1:])).flatten(1).sum(0)  # noqa: E731
    jac = torch.autograd.functional.jacobian(flat, x.flatten(1), vectorize=True)
    return jac.permute(1, 0, 2)


def _lipschitz_at(g, x) -> float:
    return torch.linalg.matrix_norm(_jacobian(g, x), ord=2).max().item()


def _steepest_point(act) -> float:
    """The input where the activation's per-coordinate Jacobian (a column, for CLipSwish) is largest."""
    with torch.enable_grad():
        t = torch.linspace(-8, 8, 32001, dtype=DT)[:, None].requires_grad_()
        out = act(t)
        cols = [torch.autograd.grad(out[:, i].sum(), t, retain_graph=True)[0] for i in range(out.shape[1])]
    return t[torch.cat(cols, 1).norm(dim=1).argmax()].item()


def _aim_at_steepest(g, x0):
    """Biases such that at ``x0`` every pre-activation sits where its activation is steepest."""
    with torch.no_grad():
        h = x0
        for layer in g.net[:-1]:
            w_h = layer.linear(h) - layer.linear.bias
            layer.linear.bias.copy_(_steepest_point(layer.activation) - w_h[0])
            h = layer(h)


def _ascend(g, x, steps=60, lr=0.05):
    """Inputs found by gradient ascent on the largest singular value of J_g(x)."""
    x = x.clone().requires_grad_()
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        flat = lambda t: g(t.view(-1, *x.shape[1:])).flatten(1).sum(0)  # noqa: E731
        jac = torch.autograd.functional.jacobian(flat, x.flatten(1), create_graph=True, vectorize=True)
        loss = -torch.linalg.matrix_norm(jac.permute(1, 0, 2), ord=2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("activation", ["clipswish", "lipswish", "elu"])
def test_certified_bound_holds_at_random_points(kind, activation):
    torch.manual_seed(0)
    coeff, depth = 0.9, 2
    g = _inflate(_build(kind, activation, coeff, depth))
    _set_angles(g, [0.3, 1.2])
    x = 2 * torch.randn(6, *((3,) if kind == "mlp" else (2, 3, 3)), dtype=DT)
    measured, bound = _lipschitz_at(g, x), g.lipschitz_bound()
    print(f"{kind} {activation}: measured {measured:.4f} <= certified {bound:.4f} <= c^{depth + 1} "
          f"{coeff ** (depth + 1):.4f}")
    assert measured <= bound * (1 + 1e-6)
    if kind == "mlp":  # (a k x k convolution reports its circular norm: a bound, above c on small inputs)
        assert bound <= coeff ** (depth + 1) * (1 + 1e-6)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_certified_bound_holds_under_adversarial_weights_eta_and_inputs(kind):
    """Weights 10x over their bound, eta at the ends of the circle and far around it, biases
    aiming every pre-activation at the activation's steepest point, and inputs chosen by gradient
    ascent on ||J_g(x)||: the measured Lipschitz constant never exceeds the certified bound."""
    torch.manual_seed(1)
    coeff, depth = 0.9, 2
    for angles in ([0.0, 0.0], [math.pi / 2, math.pi / 2], [0.0, math.pi / 2], [1e6, -3e5], [0.7, 2.0]):
        g = _inflate(_build(kind, "clipswish", coeff, depth))
        _set_angles(g, angles)
        for layer in g.net[:-1]:
            eta_1, eta_2 = layer.eta()
            assert (eta_1 ** 2 + eta_2 ** 2).item() == pytest.approx(coeff ** 2, rel=1e-12)  # on the circle
        shape = (3,) if kind == "mlp" else (2, 3, 3)
        x0 = torch.zeros(1, *shape, dtype=DT)
        if kind == "mlp":
            _aim_at_steepest(g, x0)
        x = _ascend(g, torch.cat([x0, 0.5 * torch.randn(3, *shape, dtype=DT)]))
        measured, bound = _lipschitz_at(g, x), g.lipschitz_bound()
        print(f"{kind} adversarial, angles {angles}: measured {measured:.5f} <= certified {bound:.5f}")
        assert measured <= bound * (1 + 1e-6)
        if kind == "mlp":  # (a k x k convolution reports its circular norm: a bound, above c on 3x3 inputs)
            assert bound <= coeff ** (depth + 1) * (1 + 1e-6)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("normalization", ["operator", "none", "kernel"])
def test_bound_through_the_normalization_component(kind, normalization):
    """The dense functions make their maps with ``model.normalization`` like mlp and conv: with
    ``operator`` the bound is certified (within c^(depth+1)); with ``none`` the weights 10x over
    the bound stay unconstrained and the reported bound (the same formula with the real norms) is
    honest: above 1, and still at least the measured Lipschitz constant; ``kernel`` normalises a
    3x3 conv by its reshaped kernel (not a bound) and reports the operator norm it really has."""
    torch.manual_seed(2)
    coeff, depth = 0.9, 2
    g = _inflate(_build(kind, coeff=coeff, depth=depth, normalization=factory("normalization", normalization)))
    _set_angles(g, [0.4, 1.0])
    names = {type(m).__name__ for m in g.modules() if hasattr(m, "lipschitz_constant")}
    x = 2 * torch.randn(6, *((3,) if kind == "mlp" else (2, 3, 3)), dtype=DT)
    x = _ascend(g, x, steps=30)
    measured, bound = _lipschitz_at(g, x), g.lipschitz_bound()
    print(f"dense_{kind}, normalization {normalization} ({', '.join(sorted(names))}): measured {measured:.4f}, "
          f"reported {bound:.4f}, c^{depth + 1} = {coeff ** (depth + 1):.4f}")
    assert measured <= bound * (1 + 1e-6)
    if normalization == "operator":
        assert g.normalization.certifies
        if kind == "mlp":  # (conv: the circular norm, a bound above c on these 3x3 inputs)
            assert bound <= coeff ** (depth + 1) * (1 + 1e-6)
    elif normalization == "none":
        assert bound > 1.0 and measured > 1.0 and not g.normalization.constrains
        assert names == {"UnconstrainedLinear"} if kind == "mlp" else names == {"UnconstrainedConv2d"}
    else:
        assert not g.normalization.certifies
        if kind == "conv":
            assert "KernelNormConv2d" in names


def test_bound_is_attained():
    """eta = (c, 0) and W_out = c [Q, 0] with Q orthogonal: J_g = c^(depth+1) Q everywhere, so
    Lip(g) = the certified bound = c^(depth+1) (the rule is not loose)."""
    torch.manual_seed(0)
    coeff, depth = 0.9, 3
    g = _build("mlp", coeff=coeff, depth=depth)
    _set_angles(g, [0.0] * depth)
    out = g.net[-1]
    q = torch.linalg.qr(torch.randn(3, 3, dtype=DT))[0]
    with torch.no_grad():
        out.weight.zero_()
        out.weight[:, :3] = 5.0 * q
    g = _inflate(g, factor=1.0)
    x = torch.randn(4, 3, dtype=DT)
    singular = torch.linalg.svdvals(_jacobian(g, x))
    torch.testing.assert_close(singular, torch.full_like(singular, coeff ** (depth + 1)), atol=1e-9, rtol=0)
    assert g.lipschitz_bound() == pytest.approx(coeff ** (depth + 1), rel=1e-9)


@pytest.mark.parametrize("angle", [math.pi / 4, 1.2])
def test_bound_is_attained_with_both_halves_of_the_concatenation(angle):
    """Both eta non-zero: W = c [e1; e2] (rows orthonormal), the CLipSwish input at its steepest
    point, and W_out = c (orthonormal rows, the first along J_h e1). Then
    ||J_g e1|| = c sqrt(eta_1^2 + eta_2^2 c^2 s^2) with s the steepest column norm of CLipSwish
    (just below 1): the certified c sqrt(eta_1^2 + eta_2^2 K^2) is attained, not only safe."""
    coeff = 0.9
    g = _build("mlp", coeff=coeff, depth=1, growth=4)  # W: 3 -> 2, CLipSwish -> 4, W_out: 7 -> 3
    _set_angles(g, [angle])
    layer, out = g.net[0], g.net[1]
    with torch.no_grad():
        layer.linear.weight.copy_(5.0 * coeff * torch.eye(3, dtype=DT)[:2])
    _inflate(g, factor=1.0)
    x0 = torch.zeros(1, 3, dtype=DT)
    _aim_at_steepest(g, x0)
    j_h = torch.autograd.functional.jacobian(lambda t: layer(t[None])[0], x0[0])  # [7, 3]
    u = j_h[:, 0] / j_h[:, 0].norm()
    # orthonormal rows, the first one +-u
    rows = torch.linalg.qr(torch.cat([u[:, None], torch.randn(7, 2, dtype=DT)], 1))[0].T
    with torch.no_grad():
        out.weight.copy_(5.0 * coeff * rows)
    _inflate(g, factor=1.0)
    measured, bound = _lipschitz_at(g, x0), g.lipschitz_bound()
    with torch.no_grad():
        eta_1, eta_2 = (float(e) for e in layer.eta())
    print(f"angle {angle:.3f} (eta {eta_1:.3f}, {eta_2:.3f}): measured {measured:.6f}, certified {bound:.6f}")
    assert measured <= bound * (1 + 1e-9)
    assert measured >= bound * (1 - 1e-4)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_width_bookkeeping_with_clipswish(kind):
    growth, depth = 8, 3
    width = 3 if kind == "mlp" else 2
    g = _build(kind, "clipswish", depth=depth, growth=growth)
    widths = []
    for i, layer in enumerate(g.net[:-1]):
        lin = layer.linear
        w_in, w_out = (lin.in_features, lin.out_features) if kind == "mlp" else (lin.in_channels, lin.out_channels)
        assert w_in == width + i * growth  # each layer adds `growth` features ...
        assert w_out == growth // 2  # ... from a map with half as many outputs (CLipSwish doubles)
        if kind == "conv":
            assert lin.kernel_size == (3, 3)
        widths.append(w_in)
    out = g.net[-1]
    w_in, w_out = (out.in_features, out.out_features) if kind == "mlp" else (out.in_channels, out.out_channels)
    assert (w_in, w_out) == (width + depth * growth, width)
    if kind == "conv":
        assert out.kernel_size == (1, 1)
    x = torch.randn(2, *((3,) if kind == "mlp" else (2, 3, 3)), dtype=DT)
    h = x
    for layer, w in zip(g.net[:-1], widths):
        h = layer(h)
        assert h.shape[1] == w + growth
    assert g(x).shape == x.shape
    assert _build(kind, "lipswish", depth=1, growth=8).net[0].linear.weight.shape[0] == 8  # no doubling
    with pytest.raises(ValueError, match="multiple of CLipSwish's width factor 2"):
        _build(kind, "clipswish", growth=5)


def test_eta_can_be_frozen_for_a_number_of_optimizer_steps():
    """The counter advances per optimiser step (on_optimizer_step, called by the tasks), not per
    forward: two forwards in one step (an implicit block's upkeep, a second estimator pass) and
    evaluation forwards do not count."""
    torch.manual_seed(0)
    g = _build("mlp", freeze_steps=2).train()
    layers = list(g.net[:-1])
    x = torch.randn(5, 3, dtype=DT)
    for step in range(3):
        g.zero_grad(set_to_none=True)
        g(x)  # an extra training forward within the same step
        g(x).pow(2).sum().backward()
        assert all(p.grad is not None for p in g.parameters())  # every parameter gets a gradient (DDP)
        frozen = step < 2
        assert all((layer.angle.grad == 0).item() == frozen for layer in layers)
        for layer in layers:
            layer.on_optimizer_step()
    assert all(layer.steps.item() == 3 for layer in layers)
    g.eval()
    with torch.no_grad():
        g(x)
    assert all(layer.steps.item() == 3 for layer in layers)
    assert "net.0.steps" in g.state_dict()
    fixed = _build("mlp", learnable_eta=False)
    assert not any("angle" in n for n, _ in fixed.named_parameters()) and "net.0.angle" in fixed.state_dict()
    with pytest.raises(ValueError, match="freeze_steps"):
        DenseLayer(torch.nn.Linear(2, 2), CLipSwish(), 0.9, freeze_steps=-1)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_residual_block_with_dense_g_inverts_and_matches_slogdet(kind):
    torch.manual_seed(0)
    g = _inflate(_build(kind, coeff=0.97, depth=2))
    _set_angles(g, [0.4, 1.1])
    assert g.linear_chain() is None
    block = InvertibleResidualBlock(g, solver=BroydenSolver(tol=1e-12), estimator=ExactLogDet()).eval()
    x = torch.randn(4, *((3,) if kind == "mlp" else (2, 3, 3)), dtype=DT)
    y, logdet = block.forward_and_logdet(x)
    err = (block.inverse(y) - x).abs().max().item()
    ref = torch.linalg.slogdet(_jacobian(block, x)).logabsdet
    ld_err = (logdet - ref).abs().max().item()
    print(f"residual block with dense_{kind}: inverse error {err:.1e}, log-det error {ld_err:.1e}")
    assert block.last_solve_info.converged and err < 1e-10
    assert ld_err < 1e-12


def test_series_gradient_modes_through_the_autograd_path():
    """A dense g takes the estimators' autograd path (no linear chain): with exact traces (the
    scaled basis as probes) and 40 terms at c = 0.5, every gradient mode gives the exact gradient."""

    class BasisPowerSeries(PowerSeriesLogDet):
        def forward(self, g, x, probes=None):
            d = x.shape[1]
            eye = torch.eye(d, dtype=x.dtype) * d ** 0.5
            return super().forward(g, x, eye[:, None, :].expand(d, x.shape[0], d))

    torch.manual_seed(0)
    g = _inflate(_build("mlp", coeff=0.5, depth=2)).train()
    x = torch.randn(4, 3, dtype=DT)

    def grads(estimator):
        _, logdet = estimator(g, x)
        return torch.autograd.grad(logdet.sum(), list(g.parameters()), allow_unused=True)

    reference = grads(ExactLogDet())
    for mode in ("backprop", "neumann", "memory_efficient"):
        got = grads(BasisPowerSeries(n_terms=40, gradient=mode))
        for a, b, p in zip(got, reference, g.parameters()):
            zero = torch.zeros_like(p)  # (a parameter the log-det does not depend on: None or 0)
            torch.testing.assert_close(zero if a is None else a, zero if b is None else b, atol=1e-10, rtol=1e-9)


def test_registered_and_validated():
    g = registry.build("residual", "dense_mlp", dim=2, depth=1, growth=2, activation="lipswish", coeff=0.8)
    assert isinstance(g, DenseMLPResidual) and g(torch.randn(3, 2)).shape == (3, 2)
    assert {"dense_mlp", "dense_conv"} <= set(registry.available("residual"))
    with pytest.raises(registry.RegistryError, match="Did you mean 'clipswish'"):
        registry.build("residual", "dense_conv", in_channels=2, activation="clipswsh")
    with pytest.raises(ValueError, match="contraction"):
        DenseMLPResidual(2, coeff=1.0)
    with pytest.raises(ValueError, match="odd"):
        DenseConvResidual(2, kernel_size=2)
