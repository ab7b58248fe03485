"""Every normalisation against materialised Jacobians (float64): ``operator`` within c, ``kernel``
above c on a padded 3x3 conv (and honest about it), ``none`` unbounded and reported as such,
its inverse reported as failed, and the Frobenius plugin of ``registry/``."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from iresflow import registry
from iresflow.nn.activations import ELU, Identity
from iresflow.nn.block import InvertibleResidualBlock
from iresflow.nn.lipschitz import LIPSCHITZ_LAYERS, LipschitzConv2d, LipschitzLinear, update_lipschitz
from iresflow.nn.logdet import PowerSeriesLogDet
from iresflow.nn.normalization import (KernelNormalization, KernelNormConv2d, NoNormalization,
                                       OperatorNormalization, UnconstrainedConv2d, UnconstrainedLinear)
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.nn.solvers import FixedPointSolver
from iresflow.registry import factory
from helpers import jacobian_norms, spectral_norm



def _conv_operator_norm(layer, weight, size) -> float:
    """Largest singular value of the materialised map x -> conv(x, weight) at input size ``size``."""
    c = layer.in_channels

    def op(x):
        return F.conv2d(x.view(1, c, *size), weight, None, layer.stride, layer.padding).flatten()

    zero = torch.zeros(c * size[0] * size[1], dtype=weight.dtype)
    return spectral_norm(torch.autograd.functional.jacobian(op, zero, vectorize=True))



def _linear_maps(module):
    return [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _scale_weights(module, factor):
    with torch.no_grad():
        for m in _linear_maps(module):
            m.weight.mul_(factor)


def _constant_taps(layer):
    """The adversarial kernel for the kernel-matrix norm: every tap the same rank-one matrix.
    Its reshaped matrix has norm 3 |a||b| while the convolution (a 3x3 box filter on the
    channel mixing a b^T) has norm close to 9 |a||b| away from the borders."""
    with torch.no_grad():
        a = torch.randn(layer.out_channels, 1, 1, 1, dtype=layer.weight.dtype)
        b = torch.randn(1, layer.in_channels, 1, 1, dtype=layer.weight.dtype)
        layer.weight.copy_((a * b).expand_as(layer.weight) * 10.0)


# --------------------------------------------------------------------------- operator


def test_default_is_operator_and_results_are_unchanged():
    """``normalization`` absent, ``operator`` built and the pre-existing layers: the same
    layers, weights and outputs from the same seed."""
    x = torch.randn(5, 3)
    nets = []
    for norm in (None, OperatorNormalization(), factory("normalization", "operator")):
        torch.manual_seed(0)
        nets.append(MLPResidual(3, hidden=(8, 8), coeff=0.8, normalization=norm))
    torch.manual_seed(0)
    reference = [LipschitzLinear(3, 8, coeff=0.8 / 1.0), LipschitzLinear(8, 8, coeff=0.8),
                 LipschitzLinear(8, 3, coeff=0.8)]
    for g in nets:
        layers = [m for m in g.net if isinstance(m, torch.nn.Linear)]
        assert [type(m) for m in layers] == [LipschitzLinear] * 3
        for m, ref in zip(layers, reference):
            torch.testing.assert_close(m.weight, ref.weight, rtol=0, atol=0)
        # eval mode: a training forward would run a power iteration and change g
        torch.testing.assert_close(g.eval()(x), nets[0].eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("adversarial", [False, True])
def test_operator_normalised_conv_is_within_c(adversarial):
    torch.manual_seed(0)
    layer = OperatorNormalization().conv2d(3, 4, 3, padding=1, input_size=(8, 8), coeff=0.7).double()
    if adversarial:
        _constant_taps(layer)
    else:
        _scale_weights(layer, 10.0)
    update_lipschitz(layer, n_iterations=2000)
    operator = _conv_operator_norm(layer, layer.normalized_weight().detach(), (8, 8))
    assert operator == pytest.approx(0.7, rel=1e-4)
    assert operator * (1 - 1e-9) <= layer.lipschitz_constant()  # the reported constant is a bound


def test_operator_residual_jacobian_within_c_after_scaling_up():
    torch.manual_seed(0)
    coeff = 0.9
    g = ConvResidual(2, input_size=(5, 5), hidden_channels=6, activation=factory("activation", "elu"),
                     coeff=coeff, normalization=factory("normalization", "operator")).double()
    _scale_weights(g, 10.0)
    update_lipschitz(g, n_iterations=1500)
    norms = jacobian_norms(g, torch.randn(4, 2, 5, 5, dtype=torch.float64))
    assert max(norms) <= g.lipschitz_bound() * (1 + 1e-5)
    for m in _linear_maps(g):  # every map within c (k x k: the materialised operator)
        w = m.normalized_weight().detach()
        norm = _conv_operator_norm(m, w, (5, 5)) if w.shape[-1] > 1 else spectral_norm(w.flatten(1))
        assert norm <= coeff * (1 + 1e-5)


# --------------------------------------------------------------------------- kernel


def test_kernel_normalisation_misses_c_on_a_padded_3x3_conv_and_reports_it(capsys):
    torch.manual_seed(0)
    coeff = 0.9
    layer = KernelNormalization().conv2d(3, 4, 3, padding=1, input_size=(8, 8), coeff=coeff).double()
    assert isinstance(layer, KernelNormConv2d)
    _constant_taps(layer)
    update_lipschitz(layer, n_iterations=2000)
    weight = layer.normalized_weight().detach()
    # What it normalises: the reshaped kernel matrix, to exactly c ...
    assert spectral_norm(weight.flatten(1)) == pytest.approx(coeff, rel=1e-6)
    # ... which is not the operator: the convolution's norm is far above c.
    operator = _conv_operator_norm(layer, weight, (8, 8))
    ratio = operator / coeff
    assert ratio > 2.0
    # The reported bound covers the real operator norm, not c.
    assert operator * (1 - 1e-9) <= layer.lipschitz_constant() <= operator * 1.3
    assert layer.kernel_ratio() == pytest.approx(ratio, rel=1e-4)
    with capsys.disabled():
        print(f"\n[kernel normalisation, 3->4 channels, 3x3, padding 1, 8x8, constant taps] "
              f"operator norm / c = {ratio:.3f}")


def test_kernel_normalisation_on_random_weights_and_in_a_residual():
    torch.manual_seed(1)
    coeff = 0.9
    layer = KernelNormalization().conv2d(3, 5, 3, padding=1, input_size=(8, 8), coeff=coeff).double()
    _scale_weights(layer, 10.0)
    update_lipschitz(layer, n_iterations=2000)
    operator = _conv_operator_norm(layer, layer.normalized_weight().detach(), (8, 8))
    assert operator > 1.2 * coeff  # random weights: measurably above c too
    assert operator * (1 - 1e-9) <= layer.lipschitz_constant() <= operator * 1.3

    g = ConvResidual(2, input_size=(6, 6), hidden_channels=6, coeff=coeff,
                     normalization=factory("normalization", "kernel")).double()
    assert [type(m) for m in _linear_maps(g)] == [KernelNormConv2d, LipschitzConv2d, KernelNormConv2d]
    _scale_weights(g, 10.0)
    update_lipschitz(g, n_iterations=1500)
    norms = jacobian_norms(g, torch.randn(4, 2, 6, 6, dtype=torch.float64))
    # Honest: the reported bound (product of measured operator norms) covers the true Lipschitz constant.
    assert max(norms) <= g.lipschitz_bound() * (1 + 1e-4)
    assert g.lipschitz_bound() > coeff ** 3


def test_kernel_and_operator_agree_for_dense_layers():
    torch.manual_seed(0)
    layer = KernelNormalization().linear(6, 5, coeff=0.8).double()
    _scale_weights(layer, 10.0)
    update_lipschitz(layer, n_iterations=500)
    assert spectral_norm(layer.normalized_weight().detach()) == pytest.approx(0.8, rel=1e-6)


def test_kernel_conv_state_round_trips():
    torch.manual_seed(0)
    layer = KernelNormConv2d(2, 3, 3, padding=1, input_size=(5, 5), coeff=0.9)
    fresh = KernelNormConv2d(2, 3, 3, padding=1, coeff=0.9)  # lazily sized
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.normalized_weight(), layer.normalized_weight())
    assert fresh.lipschitz_constant() == pytest.approx(layer.lipschitz_constant())


# --------------------------------------------------------------------------- none (vanilla)


def test_a_training_forward_iterates_only_the_vectors_that_normalise():
    """operator with the papers' upkeep: its vectors (they divide the weight); kernel: the kernel-matrix
    vectors, not the report-only operator vectors; none: nothing (the raw weight); operator with the
    default upkeep: nothing while the weight is the one its vectors were converged for, and a
    convergence once it moved. update_lipschitz iterates them all."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 5)
    settings = {"padding": 1, "input_size": (5, 5), "upkeep": "power_iteration"}
    layers = {"operator": LipschitzConv2d(2, 3, 3, coeff=0.9, **settings),
              "kernel": KernelNormConv2d(2, 3, 3, coeff=0.9, **settings),
              "none": UnconstrainedConv2d(2, 3, 3, **settings),
              "converged": LipschitzConv2d(2, 3, 3, padding=1, input_size=(5, 5), coeff=0.9)}
    for name, layer in layers.items():
        layer.train()
        op = layer.u.clone()
        kern = layer.kernel_u.clone() if name == "kernel" else None
        layer(x).sum().backward()
        assert torch.equal(layer.u, op) == (name != "operator"), name
        if name == "converged":
            with torch.no_grad():
                layer.weight.add_(0.3 * torch.randn_like(layer.weight))  # what an optimiser step does
            layer(x)
            assert not torch.equal(layer.u, op)
            assert float(layer.sigma) == pytest.approx(_conv_operator_norm(layer, layer.weight.detach(), (5, 5)),
                                                       rel=1e-3)
        if kern is not None:
            assert not torch.equal(layer.kernel_u, kern)
        update_lipschitz(layer, n_iterations=1)
        assert not torch.equal(layer.u, op), name


def test_none_keeps_the_architecture_and_the_parameter_count():
    for make in (lambda n: MLPResidual(4, hidden=(16, 16), normalization=n),
                 lambda n: ConvResidual(2, input_size=(6, 6), hidden_channels=8, normalization=n)):
        torch.manual_seed(0)
        constrained = make(OperatorNormalization())
        torch.manual_seed(0)
        vanilla = make(NoNormalization())
        shapes = [tuple(p.shape) for p in constrained.parameters()]
        assert shapes == [tuple(p.shape) for p in vanilla.parameters()]
        for m in _linear_maps(vanilla):
            assert isinstance(m, (UnconstrainedLinear, UnconstrainedConv2d)) and isinstance(m, LIPSCHITZ_LAYERS)
            assert m.normalized_weight() is m.weight


def test_none_is_unconstrained_and_its_bound_says_so():
    torch.manual_seed(0)
    g = MLPResidual(4, hidden=(16, 16), activation=Identity(), coeff=0.5,
                    normalization=factory("normalization", "none")).double()
    _scale_weights(g, 5.0)
    update_lipschitz(g, n_iterations=500)
    norms = jacobian_norms(g, torch.randn(4, 4, dtype=torch.float64))
    assert min(norms) > 1.0  # no constraint: Lip(g) > 1, far above coeff
    # Linear g: its Lipschitz constant is the norm of the product; the bound is the product of norms.
    assert max(norms) <= g.lipschitz_bound() * (1 + 1e-9)
    product = math.prod(spectral_norm(m.weight.detach()) for m in _linear_maps(g))
    assert g.lipschitz_bound() == pytest.approx(product, rel=1e-9)


def test_none_conv_reports_its_real_operator_norm():
    torch.manual_seed(0)
    layer = NoNormalization().conv2d(3, 4, 3, padding=1, input_size=(6, 6), coeff=0.9).double()
    _scale_weights(layer, 10.0)
    update_lipschitz(layer, n_iterations=2000)
    operator = _conv_operator_norm(layer, layer.weight.detach(), (6, 6))
    assert operator > 5.0
    # a certified upper bound (the circular convolution's norm) of the raw weight's operator norm
    assert operator * (1 - 1e-9) <= layer.lipschitz_constant() <= operator * 1.3


def test_vanilla_inverse_is_reported_as_failed():
    torch.manual_seed(0)
    g = MLPResidual(4, hidden=(16, 16), activation=ELU(), normalization=NoNormalization())
    _scale_weights(g, 4.0)
    update_lipschitz(g, n_iterations=200)
    assert g.lipschitz_bound() > 1.0
    block = InvertibleResidualBlock(g, solver=FixedPointSolver(tol=1e-6, max_iter=100))
    x = torch.randn(16, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_rec = block.inverse(block(x))
    info = block.last_solve_info
    assert not info.converged
    assert not math.isfinite(info.residual) or info.residual > 1.0  # diverged, not merely slow
    assert any("did not converge" in str(w.message) for w in caught)
    assert not torch.allclose(x_rec, x, atol=1e-3)
    with pytest.raises(Exception, match="did not converge"):
        InvertibleResidualBlock(g, solver=FixedPointSolver(max_iter=100, strict=True)).inverse(block(x))


def test_vanilla_flow_refuses_series_estimators_and_trains_with_the_exact_log_det():
    for estimator in (None, factory("estimator", {"name": "power_series", "n_terms": 8}),
                      factory("estimator", "russian_roulette")):
        with pytest.raises(ValueError, match="estimator=exact"):
            registry.build("model", "iresnet_flow", in_shape=(2,), n_blocks=1, hidden=[8],
                           normalization={"name": "none"}, estimator=estimator)
    flow = registry.build("model", "iresnet_flow", in_shape=(2,), n_blocks=2, hidden=[8],
                          normalization={"name": "none"}, estimator={"name": "exact"}).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    flow.train()
    flow.log_prob(x).mean().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_vanilla_flow_is_a_one_line_config_error(capsys):
    from iresflow.cli import main

    code = main(["train", "model.normalization=none", "logger=none", "trainer.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "estimator=exact" in err[0]


# --------------------------------------------------------------------------- all of them


@pytest.mark.parametrize("name", ["operator", "none", "kernel", "frobenius"])
def test_every_normalisation_keeps_the_fast_jacobian_path(name):
    """The chain path (weights from ``weight_for``) gives the same series as autograd's."""
    torch.manual_seed(0)
    g = ConvResidual(2, input_size=(4, 4), hidden_channels=4, coeff=0.9,
                     normalization=factory("normalization", name)).double()
    assert g.linear_chain() is not None
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    probes = torch.randn(1, *x.shape, dtype=torch.float64)
    est = PowerSeriesLogDet(n_terms=4)
    g.eval()
    _, fast = est(g, x, probes=probes)
    hook = g.register_forward_hook(lambda mod, args, out: out)  # a hook turns the chain path off
    assert g.linear_chain() is None
    _, slow = est(g, x, probes=probes)
    hook.remove()
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_normalisations_are_registered_and_built_from_config_nodes():
    assert {"operator", "none", "kernel", "frobenius"} <= set(registry.available("normalization"))
    g = registry.build("residual", "mlp", dim=3, hidden=[8], normalization={"name": "none"})
    assert all(isinstance(m, UnconstrainedLinear) for m in _linear_maps(g))
    # The residual's power-iteration settings fill what the node leaves unset; the node wins.
    g = registry.build("residual", "mlp", dim=3, hidden=[8], n_iterations=3,
                       normalization={"name": "operator", "max_iterations": 7})
    assert {(m.n_iterations, m.max_iterations) for m in _linear_maps(g)} == {(3, 7)}
    with pytest.raises(registry.RegistryError, match="Did you mean 'kernel'"):
        registry.build("residual", "mlp", dim=3, normalization="kernal")
    with pytest.raises(ValueError, match="contraction"):
        MLPResidual(3, coeff=1.5, normalization=KernelNormalization())
    MLPResidual(3, coeff=1.5, normalization=NoNormalization())  # vanilla has no c to check


# --------------------------------------------------------------------------- the plugin


def test_frobenius_plugin_is_certified():
    torch.manual_seed(0)
    coeff = 0.9
    norm = registry.build("normalization", "frobenius")
    g = MLPResidual(3, hidden=(16, 16), activation=ELU(), coeff=coeff, normalization=norm).double()
    _scale_weights(g, 10.0)
    norms = jacobian_norms(g, torch.randn(6, 3, dtype=torch.float64) * 2)
    assert max(norms) <= g.lipschitz_bound() * (1 + 1e-9) <= coeff ** 3 * (1 + 1e-6)

    conv = norm.conv2d(3, 4, 3, padding=1, input_size=(8, 8), coeff=coeff).double()
    _constant_taps(conv)  # the worst case of the tap-sum bound (all taps aligned)
    weight = conv.weight_for(torch.zeros(1)).detach()
    operator = _conv_operator_norm(conv, weight, (8, 8))
    assert operator <= conv.lipschitz_constant() * (1 + 1e-9)
    assert conv.lipschitz_constant() == pytest.approx(coeff, rel=1e-9)


def test_frobenius_plugin_trains_a_flow_from_a_config_line():
    flow = registry.build("model", "iresnet_flow", in_shape=(2,), n_blocks=2, hidden=[8],
                          normalization="frobenius")
    x = torch.randn(16, 2)
    flow.train()
    flow.log_prob(x).mean().backward()
    assert max(b.lipschitz_bound() for b in flow.blocks) <= 0.97 ** 2 * (1 + 1e-6)
