"""Numerical precision: bfloat16 autocast, and the fast paths against autograd.

1. Mixed precision. Under ``torch.autocast`` with bfloat16, ``g`` may run in bf16
   but the log-det series must accumulate in float32 (each ``w^T v`` is cast to
   float32 before it is summed) and the returned log-det is float32. The spectral
   norm of a Lipschitz layer is computed in float32 whatever the autocast state.
2. The fast paths give the numbers autograd gives. For a residual function that
   is a chain of linear maps and elementwise activations, the estimators apply
   the Jacobian from its factors (and the memory-efficient one differentiates by
   hand, with closed-form second derivatives); the spectral normalisation has a
   hand-written backward; small matrices run their power iterations through the
   Gram matrix; thin convolutions run as matmuls. Each is checked in float64
   against the generic autograd path (``g`` hidden behind an opaque wrapper).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iresflow.nn.spectral_norm as spectral_norm
from iresflow.models.flow import ResidualFlow
from iresflow.nn.activations import ELU, LipSwish, Softplus, _ValueAndSlope
from iresflow.nn.conv_ops import conv_forward, conv_input_grad, conv_strategy, conv_weight_grad
from iresflow.nn.lipschitz import LipschitzConv2d, LipschitzLinear, update_lipschitz
from iresflow.nn.logdet import PowerSeriesLogDet, RussianRouletteLogDet
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.registry import factory

from helpers import Opaque, logdet_and_grads

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
# Measured on this block (MLP 4-32-4, c = 0.9, 8 terms, 64 samples, fixed probes): the
# largest |bf16 - fp32| / (1 + |fp32|) over the samples was 0.006 in every gradient mode;
# the bound leaves a margin of about 8x.
BLOCK_TOL = 0.05
# Measured for the 2-block iresnet_flow's log_prob (128 samples, seeded probes): 0.0005.
MODEL_TOL = 0.01


def _rel_err(a, b):
    return ((a - b).abs() / (1.0 + b.abs())).max().item()


# --------------------------------------------------------------------------- mixed precision


def _bf16_block(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPResidual(4, [32], coeff=0.9), torch.randn(64, 4)
    # k x k kernels (3-1-3): the fused path's convolution weight gradients meet a bfloat16
    # cotangent and a float32 tangent. Converged power-iteration vectors, so that the
    # training forward's iteration leaves the function unchanged between the two calls.
    g = ConvResidual(2, (6, 6), 8, coeff=0.9)
    update_lipschitz(g, n_iterations=2000)
    return g, torch.randn(16, 2, 6, 6)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("mode", ["backprop", "neumann", "memory_efficient"])
def test_block_logdet_under_bf16_autocast_accumulates_in_float32(mode, kind):
    g, x = _bf16_block(kind)
    probes = torch.randn(1, *x.shape)
    est = PowerSeriesLogDet(n_terms=8, gradient=mode)
    _, ref = est(g, x, probes=probes)
    with torch.autocast(**BF16):
        gx, logdet = est(g, x, probes=probes)
    assert gx.dtype == torch.bfloat16  # g itself ran in bf16 ...
    assert logdet.dtype == torch.float32  # ... the series did not
    assert _rel_err(logdet.detach(), ref.detach()) <= BLOCK_TOL
    # Backward works through the mixed-precision graph and reaches float32 parameters.
    (logdet.mean() + gx.float().pow(2).mean()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in g.parameters())


def test_block_logdet_without_grad_under_bf16_is_float32():
    torch.manual_seed(0)
    g = MLPResidual(4, [32], coeff=0.9)
    x, probes = torch.randn(64, 4), torch.randn(1, 64, 4)
    est = PowerSeriesLogDet(n_terms=8)
    with torch.no_grad():
        _, ref = est(g, x, probes=probes)
        with torch.autocast(**BF16):
            _, logdet = est(g, x, probes=probes)
    assert logdet.dtype == torch.float32
    assert _rel_err(logdet, ref) <= BLOCK_TOL


def test_model_log_prob_under_bf16_autocast():
    torch.manual_seed(0)
    model = ResidualFlow(in_shape=(2,), n_blocks=2, hidden=[32, 32],
                         estimator=PowerSeriesLogDet(n_terms=8))
    x = torch.randn(128, 2)
    model.log_prob(x)  # ActNorm's data-dependent init, in float32
    torch.manual_seed(1)  # the probes are random: the same draws in both calls
    ref = model.log_prob(x)
    torch.manual_seed(1)
    with torch.autocast(**BF16):
        lp = model.log_prob(x)
    assert lp.dtype == torch.float32
    assert _rel_err(lp.detach(), ref.detach()) <= MODEL_TOL
    (-lp.mean()).backward()


def test_spectral_norm_stays_float32_under_autocast():
    torch.manual_seed(0)
    layer = LipschitzLinear(8, 6, coeff=0.9)
    conv = LipschitzConv2d(2, 3, 3, padding=1, input_size=(5, 5), coeff=0.9)
    with torch.autocast(**BF16):
        for m in (layer, conv):
            assert m.spectral_norm().dtype == torch.float32
            assert m.normalized_weight().dtype == torch.float32
            m.power_iteration(3)
            assert m.u.dtype == m.v.dtype == m.sigma.dtype == torch.float32
        assert layer(torch.randn(3, 8)).dtype == torch.bfloat16  # the map itself is autocast


# --------------------------------------------------------------------------- fast paths vs autograd


def _residual(kind, activation, preact):
    torch.manual_seed(0)
    if kind == "mlp":
        g = MLPResidual(3, (16, 16), activation=factory("activation", activation), coeff=0.9, n_iterations=0,
                        preact=preact)
        x = torch.randn(5, 3)
    else:
        g = ConvResidual(2, (6, 6), 4, activation=factory("activation", activation), coeff=0.9, n_iterations=0,
                         preact=preact)
        x = torch.randn(3, 2, 6, 6)
    with torch.no_grad():  # weights above the bound: the normalisation is active
        for m in g.modules():
            if isinstance(m, (LipschitzLinear, LipschitzConv2d)):
                m.weight.mul_(3.0)
    update_lipschitz(g, n_iterations=20)
    return g.double(), x.double()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("activation", ["lipswish", "elu", "softplus", "relu", "identity"])
@pytest.mark.parametrize("mode", ["backprop", "neumann", "memory_efficient"])
@pytest.mark.parametrize("n_probes", [1, 2])
def test_structured_paths_match_autograd(kind, activation, mode, n_probes):
    # (relu with several probes once crashed the memory-efficient path: a None second derivative)
    g, x = _residual(kind, activation, preact=(activation not in ("softplus", "relu")))
    probes = torch.randn(n_probes, *x.shape, dtype=x.dtype)
    est = PowerSeriesLogDet(n_terms=4, gradient=mode)  # MLP, 1 probe: the dense-Jacobian path (D=3 <= 4)
    for weights in (torch.ones(x.shape[0], dtype=x.dtype), torch.rand(x.shape[0], dtype=x.dtype)):
        fast = logdet_and_grads(est, g, x, weights, probes=probes)
        ref = logdet_and_grads(est, Opaque(g), x, weights, probes=probes)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_structured_roulette_and_frozen_parameters_match_autograd():
    g, x = _residual("mlp", "lipswish", preact=True)
    for p in list(g.parameters())[:2]:
        p.requires_grad_(False)
    probes = torch.randn(1, *x.shape, dtype=x.dtype)
    est = RussianRouletteLogDet(n_terms=2, gradient="memory_efficient")
    w = torch.ones(x.shape[0], dtype=x.dtype)
    torch.manual_seed(3)
    fast = logdet_and_grads(est, g, x, w, probes=probes)
    torch.manual_seed(3)  # the same N
    ref = logdet_and_grads(est, Opaque(g), x, w, probes=probes)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_lipswish_closed_form_derivatives():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    lipswish = LipSwish().double()

    def value_and_slope(x, beta):  # the autograd function derived from LipSwish's formulas
        return _ValueAndSlope.apply(lipswish, x, beta)

    assert torch.autograd.gradcheck(value_and_slope, (x, beta))
    assert torch.autograd.gradgradcheck(value_and_slope, (x, beta))
    for act in (LipSwish(0.7).double(), ELU(), Softplus()):
        y, d = act.forward_and_derivative(x)
        d_ref, = torch.autograd.grad(act(x).sum(), x, create_graph=True)
        torch.testing.assert_close(y, act(x))
        torch.testing.assert_close(d, d_ref)


def test_soft_normalisation_gradient_matches_autograd():
    torch.manual_seed(0)
    for layer in (LipschitzLinear(4, 3, coeff=0.5), LipschitzConv2d(2, 3, 3, padding=1, input_size=(4, 4), coeff=0.5),
                  LipschitzConv2d(2, 3, 3, stride=2, padding=1, input_size=(5, 5), coeff=0.5),
                  LipschitzConv2d(2, 3, 1, input_size=(4, 4), coeff=0.5), LipschitzLinear(4, 3, coeff=50.0)):
        layer = layer.double()
        with torch.no_grad():
            layer.weight.mul_(10.0)
        update_lipschitz(layer, n_iterations=30)
        g = torch.randn_like(layer.weight)
        fast, = torch.autograd.grad((layer.normalized_weight() * g).sum(), layer.weight)
        w = layer.weight
        ref_w = w / torch.clamp(layer._sigma(w) / layer.coeff, min=1.0)
        ref, = torch.autograd.grad((ref_w * g).sum(), w)
        torch.testing.assert_close(layer.normalized_weight(), ref_w)
        torch.testing.assert_close(fast, ref)


@pytest.mark.parametrize("shape", [(64, 2), (2, 64), (12, 30), (3, 3)])
@pytest.mark.parametrize("n", [1, 2, 5, 300])
def test_gram_power_iteration_equals_plain_iteration(shape, n, monkeypatch):
    torch.manual_seed(0)
    a = LipschitzLinear(shape[1], shape[0]).double()
    b = copy.deepcopy(a)
    a.power_iteration(n)  # small side: through the Gram matrix
    monkeypatch.setattr(spectral_norm, "_GRAM_MAX_DIM", 0)
    b.power_iteration(n)  # matrix-vector iterations
    for name in ("u", "v", "sigma"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c,o,k,pad,stride", [(1, 5, 3, 1, 1), (5, 1, 3, 1, 1), (5, 2, 3, 1, 1), (2, 3, 3, 1, 1),
                                              (6, 7, 1, 0, 1), (8, 8, 3, 1, 1), (1, 4, 3, 1, 2)])
def test_thin_convolutions_as_matmuls(c, o, k, pad, stride):
    torch.manual_seed(0)
    m = nn.Conv2d(c, o, k, stride=stride, padding=pad).double()
    kind = conv_strategy(m)
    x = torch.randn(3, c, 7, 6, dtype=torch.float64)
    ref = F.conv2d(x, m.weight, m.bias, m.stride, m.padding)
    g = torch.randn_like(ref)
    gin, gw, _ = torch.ops.aten.convolution_backward(g, x, m.weight, None, m.stride, m.padding, m.dilation, False,
                                                     [0, 0], 1, [True, True, False])
    h, w = x.shape[-2:]
    op = tuple(int(s + 2 * pad - k - (so - 1) * stride) for s, so in zip((h, w), ref.shape[-2:]))
    torch.testing.assert_close(conv_forward(kind, m, x, m.weight, m.bias), ref)
    torch.testing.assert_close(conv_input_grad(kind, m, g, m.weight, op), gin)
    torch.testing.assert_close(conv_weight_grad(kind, m, g, x, m.weight), gw)


@pytest.mark.skipif(not __import__("iresflow.nn.logdet.gemm", fromlist=["x"]).onednn_enabled,
                    reason="this torch build has no oneDNN matmul op")
@pytest.mark.parametrize("activation", ["lipswish", "elu"])
def test_onednn_products_equal_torch_products_in_float32(activation, monkeypatch):
    """The fused path's float32 matrix products go to oneDNN (float64 ones, as in the tests
    above, to torch): the same values and gradients up to float32 summation order."""
    from iresflow.nn.logdet import gemm

    torch.manual_seed(0)
    g = MLPResidual(3, (64, 64), activation=factory("activation", activation), coeff=0.9, n_iterations=0)
    x = torch.randn(256, 3)
    est = PowerSeriesLogDet(n_terms=6, gradient="memory_efficient")
    w = torch.rand(x.shape[0])
    probes = torch.randn(1, *x.shape)
    fast = logdet_and_grads(est, g, x, w, probes=probes)
    monkeypatch.setattr(gemm, "onednn_enabled", False)
    ref = logdet_and_grads(est, g, x, w, probes=probes)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
