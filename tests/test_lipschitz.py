"""Spectral normalisation, activations and residual functions against exact references.

The reference for a Lipschitz constant is the largest singular value of the
materialised Jacobian (``torch.autograd.functional.jacobian`` + ``matrix_norm``,
float64), never the code's own estimate.
"""

import pytest
import torch
import torch.nn.functional as F

from iresflow import registry
from iresflow.nn.activations import ELU, CLipSwish, Identity, LipSwish
from iresflow.nn.conv_bound import EXACT_MAX_DIM, circular_conv_norm
from iresflow.nn.lipschitz import (LIPSCHITZ_LAYERS, LipschitzConv2d, LipschitzLinear, keep_up_lipschitz,
                                  update_lipschitz)
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.registry import factory
from helpers import jacobian_norms, spectral_norm

torch.set_default_dtype(torch.float32)



def _conv_operator_norm(layer: LipschitzConv2d) -> float:
    """Largest singular value of the materialised linear map x -> conv(x) (bias excluded)."""
    c, (h, w) = layer.in_channels, layer.input_size
    weight = layer.normalized_weight().detach()

    def op(x):
        return F.conv2d(x.view(1, c, h, w), weight, None, layer.stride, layer.padding).flatten()

    jacobian = torch.autograd.functional.jacobian(op, torch.zeros(c * h * w, dtype=weight.dtype), vectorize=True)
    return spectral_norm(jacobian)


def _inflate(module, factor=10.0):
    """Scale every normalised weight far above its bound, so the normalisation is active."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LIPSCHITZ_LAYERS):
                m.weight.mul_(factor)


@pytest.mark.parametrize("stride,padding,size", [(1, 1, (6, 6)), (2, 1, (7, 7)), (1, 0, (5, 4))])
def test_conv_operator_norm_is_coeff(stride, padding, size):
    torch.manual_seed(0)
    layer = LipschitzConv2d(3, 4, 3, stride=stride, padding=padding, input_size=size, coeff=0.7).double()
    _inflate(layer)
    update_lipschitz(layer, n_iterations=1500)
    # Soft scaling onto the bound: the operator norm of the normalised conv is c.
    operator = _conv_operator_norm(layer)
    assert operator == pytest.approx(0.7, rel=1e-4)
    # the reported constant is never below the operator norm: exact here (a small map is materialised)
    assert layer.lipschitz_constant() == pytest.approx(operator, rel=1e-9)
    # and the FFT bound used for large maps is the materialised circular convolution's norm
    weight = layer.normalized_weight().detach()
    assert circular_conv_norm(weight, layer.input_size, layer.padding) == pytest.approx(
        _circular_operator_norm(layer), rel=1e-9)


def _circular_operator_norm(layer: LipschitzConv2d) -> float:
    """The materialised circular convolution (stride 1) on the padded grid, which contains the zero-padded
    map: the exact reference of :func:`iresflow.nn.conv_bound.circular_conv_norm`."""
    c, (h, w), (ph, pw) = layer.in_channels, layer.input_size, layer.padding
    weight = layer.normalized_weight().detach()
    n_h, n_w = h + 2 * ph, w + 2 * pw

    def op(x):
        x = x.view(1, c, n_h, n_w)
        kh, kw = weight.shape[-2:]
        wrapped = torch.cat([x, x[..., :kh - 1, :]], dim=-2)  # the circular wrap, then a valid convolution
        wrapped = torch.cat([wrapped, wrapped[..., :kw - 1]], dim=-1)
        return F.conv2d(wrapped, weight).flatten()

    return spectral_norm(torch.autograd.functional.jacobian(op, torch.zeros(c * n_h * n_w, dtype=weight.dtype),
                                                            vectorize=True))


def test_the_reported_conv_bound_is_above_the_operator_norm_and_tight_on_large_inputs():
    """The circular bound is a bound at every size, and the border's excess shrinks as the input grows;
    the reported constant is exact on small maps and the circular bound on large ones."""
    torch.manual_seed(3)
    excess = []
    for size in (4, 8, 16):
        layer = LipschitzConv2d(3, 4, 3, padding=1, input_size=(size, size), coeff=0.7).double()
        operator = _conv_operator_norm(layer)
        circular = circular_conv_norm(layer.normalized_weight().detach(), (size, size), (1, 1))
        assert operator * (1 - 1e-9) <= circular
        excess.append(circular / operator - 1)
        reported = layer.lipschitz_constant()
        assert reported == pytest.approx(operator if 3 * size * size <= EXACT_MAX_DIM else circular, rel=1e-9)
    print(f"\n[conv bound] circular / zero-padded operator norm - 1 at 4x4, 8x8, 16x16: {excess}")
    assert excess[2] < excess[0] and excess[2] < 0.05


@pytest.mark.parametrize("stride,size", [(1, (8, 8)), (2, (9, 9)), (2, (8, 7))])
def test_a_wide_conv_on_a_small_output_reports_its_exact_norm(stride, size):
    """Many input channels, few output ones (g's last map): the input side is too large to materialise
    (32 x 8 x 8 = 2048) but the output side is small, and ``||W|| = ||W^T||``: the reported constant is
    the exact operator norm, not the looser circular bound."""
    torch.manual_seed(4)
    layer = LipschitzConv2d(32, 2, 3, stride=stride, padding=1, input_size=size, coeff=0.9).double()
    _inflate(layer)
    keep_up_lipschitz(layer)
    operator = _conv_operator_norm(layer)
    assert 32 * size[0] * size[1] > EXACT_MAX_DIM
    assert layer.lipschitz_constant() == pytest.approx(operator, rel=1e-9)
    assert operator == pytest.approx(0.9, rel=1e-6)          # (the upkeep's Lanczos ran on the output side)
    circular = circular_conv_norm(layer.normalized_weight().detach(), size, layer.padding)
    assert circular > operator * (1 + 1e-3)                    # what was reported before: looser


def test_reshaped_kernel_norm_would_underestimate():
    """Why the operator is iterated: the kernel-matrix norm is smaller than the operator norm."""
    torch.manual_seed(1)
    layer = LipschitzConv2d(3, 5, 3, padding=1, input_size=(8, 8), coeff=0.9).double()
    _inflate(layer)
    update_lipschitz(layer, n_iterations=1500)
    operator = _conv_operator_norm(layer)
    kernel_matrix = spectral_norm(layer.normalized_weight().detach().flatten(1))
    assert operator == pytest.approx(0.9, rel=1e-4)
    assert kernel_matrix < 0.9 * operator


def test_linear_exact_norm_and_soft_scaling():
    torch.manual_seed(0)
    big = LipschitzLinear(6, 5, coeff=0.8).double()
    _inflate(big)
    update_lipschitz(big, n_iterations=500)
    assert spectral_norm(big.normalized_weight().detach()) == pytest.approx(0.8, rel=1e-6)

    small = LipschitzLinear(6, 5, coeff=0.8).double()
    with torch.no_grad():
        small.weight.mul_(0.01)
    update_lipschitz(small, n_iterations=500)
    # Below the bound: untouched (W / max(1, sigma/c) = W).
    torch.testing.assert_close(small.normalized_weight(), small.weight, rtol=0, atol=0)


def test_one_by_one_conv_uses_the_matrix_norm():
    torch.manual_seed(0)
    layer = LipschitzConv2d(4, 3, 1, coeff=0.6).double()
    assert layer.is_matrix and layer.input_size is None
    _inflate(layer)
    update_lipschitz(layer, n_iterations=500)
    assert spectral_norm(layer.normalized_weight().detach().flatten(1)) == pytest.approx(0.6, rel=1e-6)


def test_gradient_flows_through_sigma():
    """gradcheck: the analytic gradient of W -> W / max(1, <u, W v>/c) matches finite differences
    (it would not if sigma were detached)."""
    torch.manual_seed(0)
    for layer in (LipschitzLinear(4, 3, coeff=0.5).double(),
                  LipschitzConv2d(2, 3, 3, padding=1, input_size=(4, 4), coeff=0.5).double()):
        _inflate(layer)
        update_lipschitz(layer, n_iterations=200)
        w = layer.weight.detach().clone().requires_grad_()

        def soft_scaled(t):
            return t / torch.clamp(layer._sigma(t) / layer.coeff, min=1.0)

        # The forward's weight is this function of W (u, v fixed) ...
        torch.testing.assert_close(layer.normalized_weight(), soft_scaled(layer.weight))
        assert layer.normalized_weight().grad_fn is not None
        # ... and its autograd gradient, sigma's part included, matches finite differences.
        assert torch.autograd.gradcheck(soft_scaled, (w,))


def test_power_iteration_vectors_are_singular_vectors_and_persist():
    torch.manual_seed(0)
    layer = LipschitzConv2d(2, 3, 3, padding=1, input_size=(5, 5), coeff=0.9).double()
    update_lipschitz(layer, n_iterations=1000)
    w = layer.weight.detach()
    wv = layer._op(layer.v, w)
    wtu = layer._op_t(layer.u, w)
    torch.testing.assert_close(wv, layer.sigma * layer.u, atol=1e-6, rtol=0)
    torch.testing.assert_close(wtu, layer.sigma * layer.v, atol=1e-6, rtol=0)
    state = layer.state_dict()
    assert {"u", "v", "sigma"} <= set(state)


def test_training_forward_iterates_and_eval_forward_does_not():
    torch.manual_seed(0)
    layer = LipschitzLinear(8, 8, coeff=0.9, n_iterations=2)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))  # the vectors no longer match the weight
    x = torch.randn(4, 8)
    u0 = layer.u.clone()
    layer.eval()
    layer(x)
    assert torch.equal(layer.u, u0)
    layer.train()
    layer(x)
    assert not torch.equal(layer.u, u0)


def test_lazy_conv_infers_its_input_size_and_loads_checkpoints():
    torch.manual_seed(0)
    layer = LipschitzConv2d(2, 3, 3, padding=1, coeff=0.9)
    assert update_lipschitz(layer) == 0  # nothing to iterate before the size is known
    layer(torch.randn(1, 2, 6, 6))
    assert layer.input_size == (6, 6)
    fresh = LipschitzConv2d(2, 3, 3, padding=1, coeff=0.9)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.input_size == (6, 6)
    torch.testing.assert_close(fresh.normalized_weight(), layer.normalized_weight())
    with pytest.raises(ValueError, match="input size"):
        layer(torch.randn(1, 2, 5, 5))


# --------------------------------------------------------------------------- activations


def _max_slope(act, n=20001, lo=-8.0, hi=8.0) -> float:
    x = torch.linspace(lo, hi, n, dtype=torch.float64).view(-1, 1).requires_grad_()
    (grad,) = torch.autograd.grad(act(x).sum(), x)
    return grad.abs().max().item()


@pytest.mark.parametrize("name", ["elu", "lipswish", "softplus", "relu", "identity"])
def test_activation_slope_is_within_its_declared_constant(name):
    act = registry.build("activation", name).double()
    assert _max_slope(act) <= act.lipschitz + 1e-9


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0, 30.0])
def test_lipswish_is_one_lipschitz_and_tight(beta):
    act = LipSwish(beta=beta).double()
    slope = _max_slope(act, lo=-60.0 / beta, hi=60.0 / beta, n=200001)
    assert slope <= 1.0
    assert slope > 0.99  # the 1/1.1 scaling is not loose
    assert act.beta.item() == pytest.approx(beta)


def test_clipswish_jacobian_norm_at_most_one_and_doubles_width():
    act = CLipSwish(beta=1.0).double()
    x = torch.linspace(-6, 6, 4001, dtype=torch.float64).view(-1, 1)
    assert act(x).shape == (4001, 2) and act.width_factor == 2
    # Per input coordinate the Jacobian column is (f'(x), -f'(-x)) / 1.004.
    xs = x.clone().requires_grad_()
    col = torch.stack([torch.autograd.grad(act(xs)[:, i].sum(), xs, retain_graph=True)[0] for i in range(2)])
    norms = col.pow(2).sum(0).sqrt()
    assert norms.max().item() <= 1.0
    assert norms.max().item() > 0.99


# --------------------------------------------------------------------------- residual functions



@pytest.mark.parametrize("activation", ["elu", "lipswish", "clipswish"])
@pytest.mark.parametrize("coeff", [0.5, 0.9])
def test_mlp_residual_jacobian_is_below_c(activation, coeff):
    torch.manual_seed(0)
    g = MLPResidual(3, hidden=(16, 16), activation=factory("activation", activation), coeff=coeff, preact=True).double()
    _inflate(g)
    update_lipschitz(g, n_iterations=1000)
    norms = jacobian_norms(g, torch.randn(8, 3, dtype=torch.float64) * 2)
    assert max(norms) <= coeff * (1 + 1e-6)
    # The certified bound holds and is itself within c (c per map: c^3 for 3 maps).
    assert max(norms) <= g.lipschitz_bound() * (1 + 1e-6) <= coeff * (1 + 1e-6)


@pytest.mark.parametrize("activation", ["elu", "clipswish"])
def test_conv_residual_jacobian_is_below_c(activation):
    torch.manual_seed(0)
    coeff = 0.9
    g = ConvResidual(2, input_size=(5, 5), hidden_channels=6, kernel_sizes=(3, 1, 3),
                     activation=factory("activation", activation), coeff=coeff).double()
    _inflate(g)
    update_lipschitz(g, n_iterations=1500)
    norms = jacobian_norms(g, torch.randn(4, 2, 5, 5, dtype=torch.float64))
    assert max(norms) <= coeff * (1 + 1e-5)
    assert max(norms) <= g.lipschitz_bound() * (1 + 1e-5)
    for layer in (m for m in g.modules() if isinstance(m, LipschitzConv2d)):  # each map within c
        norm = (_conv_operator_norm(layer) if not layer.is_matrix
                else spectral_norm(layer.normalized_weight().detach().flatten(1)))
        assert norm <= coeff * (1 + 1e-5)


def test_single_linear_g_reaches_its_bound():
    """With one map and identity activation, Lip(g) is exactly c: the bound is not loose."""
    torch.manual_seed(0)
    g = MLPResidual(4, hidden=(), activation=Identity(), coeff=0.75).double()
    _inflate(g)
    update_lipschitz(g, n_iterations=1000)
    assert max(jacobian_norms(g, torch.randn(3, 4, dtype=torch.float64))) == pytest.approx(0.75, rel=1e-6)


def test_residual_settings_are_validated():
    with pytest.raises(ValueError, match="contraction"):
        MLPResidual(2, coeff=1.2)
    with pytest.raises(ValueError, match="odd"):
        ConvResidual(2, input_size=(4, 4), hidden_channels=4, kernel_sizes=(2, 1, 3))
    with pytest.raises(registry.RegistryError, match="Did you mean 'lipswish'"):
        registry.build("residual", "mlp", dim=2, activation="lipswhish")


def test_mlp_bound_is_attained_with_orthogonal_maps():
    """Orthogonal maps scaled above c are normalised to c * orthogonal; with ELU in its
    linear region (large positive biases) J_g = c^3 * orthogonal: Lip(g) = c^3 exactly."""
    torch.manual_seed(0)
    coeff = 0.9
    g = MLPResidual(4, hidden=(4, 4), activation=ELU(), coeff=coeff).double()
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, LIPSCHITZ_LAYERS):
                torch.nn.init.orthogonal_(m.weight)
                m.weight.mul_(5.0)
                m.bias.fill_(50.0)
    update_lipschitz(g, n_iterations=500)
    norms = jacobian_norms(g, torch.randn(4, 4, dtype=torch.float64))
    assert max(norms) == pytest.approx(coeff ** 3, rel=1e-9)
    assert min(norms) == pytest.approx(coeff ** 3, rel=1e-9)
    assert g.lipschitz_bound() == pytest.approx(coeff ** 3, rel=1e-9)


def _lazy_conv_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same weights on every rank ...
        layer = LipschitzConv2d(2, 3, 3, padding=1, coeff=0.9)
        torch.manual_seed(100 + rank)  # ... but different random streams, as under DDP
        layer(torch.randn(2, 2, 5, 5))
        torch.save({"u": layer.u, "v": layer.v}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_lazily_sized_conv_starts_from_the_same_vectors_on_every_rank(tmp_path):
    """Vectors created at the first forward are not covered by DDP's buffer broadcast:
    the layer broadcasts them itself, so all ranks hold identical u and v."""
    import torch.multiprocessing as mp

    mp.spawn(_lazy_conv_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(a["u"], b["u"]) and torch.equal(a["v"], b["v"])
