"""The multi-scale flow's recipe options (Residual Flows, i-ResNet, i-DenseNets, ImpFlow), each against
what it claims: the layout it builds, and the whole model's log-likelihood against brute force, the
``slogdet`` of the materialised Jacobian of ``x -> z`` (float64, exact log-dets).
"""

import math

import pytest
import torch

from iresflow import registry
from iresflow.config import ConfigError, load_config
from iresflow.models import ResidualFlow
from iresflow.models.multiscale import Flattened
from iresflow.models.priors import LearnedGaussianPrior
from iresflow.nn.activations import ELU
from iresflow.nn.block import ContractionBlock, InvertibleResidualBlock
from iresflow.nn.dense import DenseConvResidual, DenseMLPResidual
from iresflow.nn.implicit import ImplicitBlock
from iresflow.nn.layers import ActNorm
from iresflow.nn.logdet import ExactLogDet
from iresflow.nn.residual import MLPResidual
from iresflow.registry import factory

DT = torch.float64
TIGHT_IMPLICIT = {"name": "implicit", "solver": {"name": "broyden", "tol": 1e-13, "max_iter": 300},
                  "adjoint_solver": {"name": "broyden", "tol": 1e-30, "rtol": 1e-13, "max_iter": 300}}


def _flow(in_shape, **kw):
    kw.setdefault("coeff", 0.9)
    kw.setdefault("estimator", ExactLogDet())
    kw.setdefault("solver", factory("solver", {"name": "fixed_point", "tol": 1e-11, "max_iter": 3000}))
    if len(in_shape) == 3:
        kw.setdefault("hidden", 4)
        kw.setdefault("n_blocks", 1)
        kw.setdefault("activation", ELU())
    else:
        kw.setdefault("hidden", [8])
        kw.setdefault("n_blocks", 2)
    return ResidualFlow(in_shape=in_shape, **kw).double()


def _initialised(flow, x, noise=None):
    flow.train()
    flow.forward_pass(x, noise)  # ActNorm's data-dependent initialisation, a power iteration
    return flow.eval()


def _brute_force_log_prob(flow, x, noise=None):
    """``log p_Z(F(x, e)) + log|det dF/d(x, e)|`` from the full Jacobian of the augmented input."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        parts = [xi.flatten()] + ([] if noise is None else [noise[i:i + 1].flatten()])
        sizes = [p.numel() for p in parts]

        def f(flat):
            pieces = flat.split(sizes)
            xs = pieces[0].view_as(xi)
            es = None if noise is None else pieces[1].view_as(noise[i:i + 1])
            return flow.forward_pass(xs, es).z.flatten()

        flat = torch.cat(parts)
        z = f(flat)
        jac = torch.autograd.functional.jacobian(f, flat)
        assert jac.shape[0] == jac.shape[1]  # a bijection of the augmented input
        out.append(flow.prior.log_prob(z.view(1, -1))[0] + torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def _image(n=3, c=1, size=4):
    return torch.rand(n, c, size, size, dtype=DT) * 0.9 + 0.05


def _check_exact(flow, x, noise=None):
    """log p(x) against brute force, and the inverse back to x."""
    _initialised(flow, x, noise)
    torch.testing.assert_close(flow.log_prob(x), _brute_force_log_prob(flow, x), rtol=0, atol=1e-9)
    assert (flow.inverse(flow.forward_and_logdet(x)[0]) - x).abs().max() < 1e-9


# --------------------------------------------------------------------------- layout

def test_fc_end_adds_fully_connected_blocks_on_the_flattened_features():
    plain = _flow((1, 4, 4), n_scales=2, n_blocks=2)
    fc = _flow((1, 4, 4), n_scales=2, n_blocks=2, fc_end=True, n_fc_blocks=3, fc_hidden=[6, 5])
    assert len(fc.blocks) == len(plain.blocks) + 3 == 7
    fc_blocks = [m for m in fc.scales[-1].layers if isinstance(m, Flattened) and isinstance(m.layer, ContractionBlock)]
    assert len(fc_blocks) == 3 and all(isinstance(m.layer.g, MLPResidual) for m in fc_blocks)
    dim = 2 * 2 * 2  # the last scale keeps 2 of the 4 channels at 2x2
    assert [lin.weight.shape[0] for lin in fc_blocks[0].layer.g.net if hasattr(lin, "weight")] == [6, 5, dim]
    assert fc.scales[0].layers is not None and not any(isinstance(m, Flattened) for m in fc.scales[0].layers)
    _check_exact(fc, _image())


def test_factor_out_off_keeps_every_dimension_to_the_end():
    flow = _flow((1, 8, 8), n_scales=3, factor_out=False)
    assert flow._z_shapes == [(16, 2, 2)]  # 1x8x8 -> 4x4x4 -> 16x2x2, nothing factored out
    x = _image(size=8)
    _initialised(flow, x)
    out = flow.forward_pass(x)
    torch.testing.assert_close(out.z, out.features[-1].flatten(1))  # z is the last scale's output, whole
    assert [f.shape[1:] for f in out.features] == [(4, 4, 4), (16, 2, 2), (16, 2, 2)]
    last_blocks = [b for b in flow.scales[-1].layers if isinstance(b, ContractionBlock)]
    assert last_blocks[0].g.in_channels == 16  # the last scale transforms all 256 dimensions
    factored = _flow((1, 8, 8), n_scales=3)
    assert factored._z_shapes == [(2, 4, 4), (4, 2, 2), (4, 2, 2)]
    _check_exact(_flow((1, 4, 4), n_scales=2, factor_out=False), _image())


def test_squeeze_first_halves_the_image_before_the_first_scale():
    flow = _flow((1, 4, 4), n_scales=2, squeeze_first=True)
    assert flow.scales[0].layers[1].g.in_channels == 4 and flow._z_shapes == [(8, 1, 1), (8, 1, 1)]
    _check_exact(flow, _image())


@pytest.mark.parametrize("in_shape", [(3,), (1, 4, 4)])
def test_actnorm_goes_before_or_after_each_block_or_nowhere(in_shape):
    def kinds(actnorm):
        layers = _flow(in_shape, actnorm=actnorm).scales[0].layers
        return ["norm" if isinstance(m, ActNorm) else "block" for m in layers]

    n = 2 if len(in_shape) == 1 else 1
    assert kinds("before") == ["norm", "block"] * n
    assert kinds("after") == ["block", "norm"] * n
    assert kinds("none") == kinds(False) == ["block"] * n
    assert kinds("input_and_after") == ["norm"] + ["block", "norm"] * n   # Residual Flows' toy layout
    assert kinds(True) == kinds("after" if len(in_shape) == 1 else "before")  # the old defaults
    with pytest.raises(ValueError, match="before, after, input_and_after, none"):
        _flow(in_shape, actnorm="middle")
    x = torch.randn(4, *in_shape, dtype=torch.float64) if len(in_shape) == 1 else _image()
    _check_exact(_flow(in_shape, actnorm="input_and_after"), x)


def test_learned_prior_is_a_diagonal_gaussian():
    torch.manual_seed(0)
    prior = LearnedGaussianPrior(5).double()
    z = torch.randn(7, 5, dtype=DT)
    torch.testing.assert_close(prior.log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1))
    with torch.no_grad():
        prior.mean.copy_(torch.randn(5))
        prior.log_std.copy_(torch.randn(5) * 0.5)
    ref = torch.distributions.Normal(prior.mean.detach(), prior.log_std.detach().exp()).log_prob(z).sum(1)
    torch.testing.assert_close(prior.log_prob(z), ref, rtol=0, atol=1e-12)
    samples = prior.sample(40000, temperature=0.5)
    std = prior.log_std.detach().exp()
    assert ((samples.mean(0) - prior.mean.detach()).abs() < 5 * 0.5 * std / 200).all()
    torch.testing.assert_close(samples.std(0), 0.5 * std, rtol=0.03, atol=0)

    flow = _flow((1, 4, 4), n_scales=2, prior=factory("prior", "learned"))
    assert {n for n, _ in flow.named_parameters() if n.startswith("prior.")} == {"prior.mean", "prior.log_std"}
    assert flow.prior.num_dims == 16
    with torch.no_grad():
        flow.prior.mean.normal_()
        flow.prior.log_std.normal_(0, 0.3)
    _check_exact(flow, _image())
    with pytest.raises(registry.RegistryError, match="learned"):  # lists the registered priors
        factory("prior", "laplace")
    with pytest.raises(TypeError, match="factory"):
        _flow((2,), prior="learned")  # models take factories, never names
    with pytest.raises(ValueError, match="latent 2"):
        _flow((2,), prior=LearnedGaussianPrior(3))


def test_a_plugin_prior_from_registry_gives_the_exact_log_likelihood():
    """The example plugin ``registry/logistic_prior.py``: its density against torch.distributions
    (a logistic is the logit of a uniform, scaled), its samples' quantiles, and a whole flow
    built from a config line whose log p(x) is the brute-force one with this prior."""
    from iresflow.run.build import build_components

    prior = registry.build("prior", "logistic", num_dims=3, scale=2.0)
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)),
        [torch.distributions.SigmoidTransform().inv, torch.distributions.AffineTransform(0.0, 2.0)])
    z = torch.randn(6, 3, dtype=DT) * 4
    torch.testing.assert_close(prior.log_prob(z), ref.log_prob(z).sum(1), rtol=0, atol=1e-12)
    samples = prior.double().sample(40000)
    # the logistic's quartiles are +-scale * log 3
    q = torch.quantile(samples[:, 0], torch.tensor([0.25, 0.75], dtype=DT))
    torch.testing.assert_close(q, torch.tensor([-2 * math.log(3), 2 * math.log(3)], dtype=DT), rtol=0, atol=0.05)

    cfg = load_config(["logger=none", "model.prior={name: logistic, scale: 0.5}", "model.n_blocks=2",
                       "model.hidden=[8]", "model.estimator=exact"])
    _, model, _ = build_components(cfg)
    assert type(model.prior).__name__ == "LogisticPrior" and model.prior.scale == 0.5
    model = model.double()
    x = torch.randn(4, 2, dtype=DT)
    _initialised(model, x)
    torch.testing.assert_close(model.log_prob(x), _brute_force_log_prob(model, x), rtol=0, atol=1e-9)
    assert model.sample(5).shape == (5, 2)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("in_shape", [(2,), (1, 4, 4)])
def test_noise_padding_models_the_augmented_input_exactly(in_shape, distribution):
    """log p(x, e) against brute force over the augmented input; log_prob(x) = log p(x, e) - log q(e)."""
    torch.manual_seed(0)
    flow = _flow(in_shape, padding=2, padding_distribution=distribution,
                 **({"n_scales": 2} if len(in_shape) == 3 else {}))
    x = _image() if len(in_shape) == 3 else torch.randn(4, 2, dtype=DT)
    e = flow.padding.draw(x)
    assert e.shape == (x.shape[0], 2, *x.shape[2:])
    if distribution == "uniform":
        assert ((e >= 0) & (e < 1)).all()
    _initialised(flow, x, e)
    joint = flow.joint_log_prob(x, e)
    torch.testing.assert_close(joint, _brute_force_log_prob(flow, x, e), rtol=0, atol=1e-9)
    log_q = torch.zeros(x.shape[0], dtype=DT) if distribution == "uniform" else \
        torch.distributions.Normal(0.0, 1.0).log_prob(e).flatten(1).sum(1)
    torch.testing.assert_close(flow.log_prob_of(flow.forward_pass(x, e)), joint - log_q)
    torch.manual_seed(5)
    drawn = flow.log_prob(x)  # fresh noise: the same formula at another e
    torch.manual_seed(5)
    again = flow.padding.draw(x if len(in_shape) == 1 else flow.logit(x))
    torch.testing.assert_close(drawn, flow.joint_log_prob(x, again) - flow.padding.log_q(again))
    z = flow.forward_and_logdet(x, e)[0]
    assert z.shape[1] == math.prod(in_shape) + 2 * math.prod(in_shape[1:]) == flow.latent_dims
    assert (flow.inverse(z) - x).abs().max() < 1e-9  # the padding is dropped on the way back
    assert flow.sample(3).shape == (3, *in_shape)
    with pytest.raises(ValueError, match="padding"):
        _flow(in_shape, **({"n_scales": 2} if len(in_shape) == 3 else {})).forward_pass(x, e)


# --------------------------------------------------------------------------- block and residual kinds

def test_block_kind_per_scale_and_implicit_blocks_inside_a_whole_flow():
    torch.manual_seed(0)
    flow = _flow((1, 4, 4), n_scales=2, n_blocks=1, coeff=0.7,
                 block=[factory("block", "residual"), factory("block", TIGHT_IMPLICIT)])
    first, second = ([b for b in scale.layers if isinstance(b, ContractionBlock)] for scale in flow.scales)
    assert isinstance(first[0], InvertibleResidualBlock) and isinstance(second[0], ImplicitBlock)
    assert flow.blocks == [first[0], second[0]]
    x = _image()
    _initialised(flow, x)
    ref = _brute_force_log_prob(flow, x)
    err = (flow.log_prob(x) - ref).abs().max().item()
    z = flow.forward_and_logdet(x)[0]
    inv_err = (flow.inverse(z) - x).abs().max().item()
    print(f"\nflow with an implicit scale: log p error {err:.1e} against slogdet, inverse error {inv_err:.1e}")
    assert err < 1e-9 and inv_err < 1e-10
    assert second[0].last_solve_info.converged
    with pytest.raises(ValueError, match="one for every scale"):
        _flow((1, 4, 4), n_scales=2, block=[factory("block", "residual")] * 3)


def test_implicit_vector_flow_log_prob_matches_brute_force():
    torch.manual_seed(0)
    flow = _flow((3,), n_blocks=2, block=factory("block", TIGHT_IMPLICIT))
    assert all(isinstance(b, ImplicitBlock) for b in flow.blocks) and len(flow.blocks) == 2
    _check_exact(flow, torch.randn(4, 3, dtype=DT))


@pytest.mark.parametrize("in_shape, residual", [((3,), {"name": "dense_mlp", "depth": 2, "growth": 4}),
                                                ((1, 4, 4), {"name": "dense_conv", "depth": 1, "growth": 4})])
def test_residual_kind_is_a_config_node(in_shape, residual):
    kw = {"n_scales": 2} if len(in_shape) == 3 else {}
    flow = _flow(in_shape, residual=factory("residual", residual), **kw)
    cls = DenseMLPResidual if len(in_shape) == 1 else DenseConvResidual
    assert flow.blocks and all(isinstance(b.g, cls) for b in flow.blocks)
    assert all(b.g.coeff == 0.9 for b in flow.blocks)  # the model's settings reach the function
    _check_exact(flow, _image() if len(in_shape) == 3 else torch.randn(3, 3, dtype=DT))
    other = {"name": "conv"} if len(in_shape) == 1 else {"name": "mlp"}
    with pytest.raises(ValueError, match="cannot be built for"):
        _flow(in_shape, residual=factory("residual", other), **kw)


def test_the_normalization_reaches_the_dense_functions():
    flow = _flow((3,), residual=factory("residual", {"name": "dense_mlp", "depth": 1, "growth": 4}),
                 normalization=factory("normalization", "none"))
    layers = [m for b in flow.blocks for m in b.g.modules() if hasattr(m, "weight")]
    assert layers and all(type(m).__name__ == "UnconstrainedLinear" for m in layers)
    assert not flow.blocks[0].invertible_by_construction()


def test_bad_options_are_refused_with_the_remedy():
    with pytest.raises(ValueError, match="at least 1"):
        _flow((2,), hidden=[0])
    with pytest.raises(ValueError, match="at least 1"):
        _flow((1, 4, 4), n_scales=2, hidden=0)
    with pytest.raises(ValueError, match="options of image flows"):
        _flow((2,), fc_end=True)
    with pytest.raises(ValueError, match="squeeze_first"):
        _flow((1, 3, 3), n_scales=1, squeeze_first=True)
    with pytest.raises(TypeError, match="block factory"):
        _flow((2,), block=InvertibleResidualBlock(MLPResidual(2, hidden=[4])))
    with pytest.raises(ValueError, match="padding"):
        _flow((2,), padding=-1)


# --------------------------------------------------------------------------- from a config line

def test_the_options_are_config_keys_and_build(tmp_path):
    from iresflow.run.build import build_components

    cfg = load_config(["logger=none", "model.block=implicit", "model.residual=dense_mlp", "model.prior=learned",
                       "model.padding=1", "model.actnorm=before", "model.solver.strict=true", "model.n_blocks=2"])
    _, model, _ = build_components(cfg)
    assert all(isinstance(b, ImplicitBlock) and isinstance(b.g_x, DenseMLPResidual) for b in model.blocks)
    assert model.blocks[0].solver.strict and isinstance(model.prior, LearnedGaussianPrior)
    assert model.padding.channels == 1 and isinstance(model.scales[0].layers[0], ActNorm)
    cfg = load_config(["experiment=cifar10_density", "data=fake", "data.image_size=[1,4,4]", "logger=none",
                       "model.n_scales=2", "model.n_blocks=1", "model.hidden=4", "model.block=[residual, implicit]",
                       "model.factor_out=false", "model.fc_end=true", "model.n_fc_blocks=1", "model.fc_hidden=[4]"])
    _, model, _ = build_components(cfg)
    assert [type(b).__name__ for b in model.blocks] == ["InvertibleResidualBlock", "ImplicitBlock", "ImplicitBlock"]
    with pytest.raises(ConfigError, match="at least 1"):
        build_components(load_config(["logger=none", "model.hidden=[0]"]))
    with pytest.raises(ConfigError, match="actnorm takes"):
        load_config(["model.actnorm=middle"])


def test_every_new_component_is_registered_with_a_description():
    for kind, name in [("block", "residual"), ("block", "implicit"), ("solver", "broyden"),
                       ("prior", "standard"), ("prior", "learned"),
                       ("residual", "dense_mlp"), ("residual", "dense_conv"), ("task", "hybrid")]:
        entry = registry.get(kind, name)
        assert entry.description and len(entry.description) > 20
