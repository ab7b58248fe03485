"""The model builders against brute force: log p(x) from the materialised Jacobian of x -> z."""

import math

import pytest
import torch
import torch.nn.functional as F

from iresflow import registry
from iresflow.models import IResNetClassifier, ResidualFlow, standard_normal_log_prob
from iresflow.nn.activations import ELU
from iresflow.nn.lipschitz import LipschitzConv2d
from iresflow.nn.logdet import ExactLogDet
from iresflow.nn.solvers import FixedPointSolver
from iresflow.registry import factory


def _brute_force_log_prob(flow: ResidualFlow, x: torch.Tensor) -> torch.Tensor:
    """log N(F(x)) + log|det dF/dx| with the full Jacobian of the whole flow (float64)."""
    out = []
    for xi in x:
        def f(t):
            z, _ = flow.forward_and_logdet(t.view(1, *flow.in_shape))
            return z.flatten()

        z = f(xi.flatten())
        jac = torch.autograd.functional.jacobian(f, xi.flatten())
        out.append(standard_normal_log_prob(z.view(1, -1))[0] + torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def _initialised(flow: ResidualFlow, x: torch.Tensor) -> ResidualFlow:
    flow.train()
    flow.log_prob(x)  # ActNorm's data-dependent initialisation, one power iteration
    return flow.eval()


def test_vector_flow_log_prob_matches_brute_force():
    torch.manual_seed(0)
    flow = ResidualFlow(in_shape=(2,), n_blocks=3, hidden=[16, 16], coeff=0.9, estimator=ExactLogDet()).double()
    x = torch.randn(6, 2, dtype=torch.float64) * 2
    _initialised(flow, x)
    ref = _brute_force_log_prob(flow, x)
    torch.testing.assert_close(flow.log_prob(x), ref, rtol=0, atol=1e-10)


def test_image_flow_log_prob_matches_brute_force():
    """Logit transform, ActNorms, conv blocks, a squeeze and a factor-out: all in the log-det."""
    torch.manual_seed(0)
    flow = ResidualFlow(in_shape=(1, 4, 4), n_blocks=1, hidden=4, n_scales=2, coeff=0.9,
                        activation=ELU(), estimator=ExactLogDet(), logit_alpha=0.05).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    _initialised(flow, x)
    ref = _brute_force_log_prob(flow, x)
    torch.testing.assert_close(flow.log_prob(x), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_flow_inverse_reproduces_the_input(solver):
    torch.manual_seed(0)
    vec = ResidualFlow(in_shape=(2,), n_blocks=4, hidden=[32, 32], coeff=0.9,
                       solver=factory("solver", {"name": solver, "tol": 1e-6, "max_iter": 1000}))
    x = torch.randn(16, 2)
    _initialised(vec, x)
    z, _ = vec.forward_and_logdet(x)
    assert (vec.inverse(z) - x).abs().max().item() < 1e-5

    img = ResidualFlow(in_shape=(3, 8, 8), n_blocks=2, hidden=8, n_scales=3, coeff=0.9,
                       solver=factory("solver", {"name": solver, "tol": 1e-6, "max_iter": 1000}))
    x = torch.rand(4, 3, 8, 8) * 0.98 + 0.01
    _initialised(img, x)
    z, _ = img.forward_and_logdet(x)
    assert z.shape == (4, 3 * 8 * 8)
    assert (img.inverse(z) - x).abs().max().item() < 1e-5
    assert all(b.last_solve_info.converged for b in img.blocks)


def test_flow_samples_have_the_data_shape_and_temperature_shrinks_them():
    torch.manual_seed(0)
    flow = ResidualFlow(in_shape=(2,), n_blocks=2, hidden=[16], coeff=0.9, actnorm=False)
    flow.eval()
    cold = flow.sample(500, temperature=0.1)
    warm = flow.sample(500, temperature=1.0)
    assert cold.shape == warm.shape == (500, 2)
    assert cold.std() < warm.std()


def test_flow_builder_reports_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        ResidualFlow(in_shape=(1, 6, 6), n_scales=3, hidden=4)
    with pytest.raises(ValueError, match="in_shape"):
        ResidualFlow(in_shape=(2, 2), hidden=4)
    with pytest.raises(ValueError, match="hidden channels"):
        ResidualFlow(in_shape=(1, 4, 4), hidden=[4, 4])


def test_registered_models_are_built_from_config_nodes():
    model = registry.build_node("model", {"name": "iresnet_flow", "n_blocks": 1, "hidden": [8]}, in_shape=(2,))
    assert isinstance(model, ResidualFlow)
    clf = registry.build_node("model", {"name": "iresnet_classifier", "stages": [[1, 8], [1, 8]],
                                        "init_pad": 1}, in_shape=(1, 4, 4), num_classes=3)
    assert isinstance(clf, IResNetClassifier)


def test_classifier_features_are_invertible_and_logits_have_the_class_count():
    torch.manual_seed(0)
    clf = IResNetClassifier(in_shape=(3, 8, 8), num_classes=7, stages=[[2, 8], [2, 16]], init_pad=5,
                            coeff=0.9, solver=FixedPointSolver(tol=1e-6, max_iter=1000))
    x = torch.randn(4, 3, 8, 8)
    clf.train()
    assert clf(x).shape == (4, 7)
    clf.eval()
    feats = clf.features(x)
    assert feats.shape == (4, 4 * (3 + 5), 4, 4)  # padded to 8 channels, squeezed once
    assert (clf.features_inverse(feats) - x).abs().max().item() < 1e-5
    assert len(clf.blocks) == 4
    for layer in (m for m in clf.modules() if isinstance(m, LipschitzConv2d)):  # every map within c
        w = layer.normalized_weight().detach().double()
        if layer.is_matrix:
            norm = torch.linalg.matrix_norm(w.flatten(1), ord=2)
        else:
            c, (h, wd) = w.shape[1], layer.input_size
            eye = torch.eye(c * h * wd, dtype=torch.float64).view(-1, c, h, wd)
            norm = torch.linalg.matrix_norm(F.conv2d(eye, w, None, layer.stride, layer.padding).flatten(1), ord=2)
        assert float(norm) <= 0.9 * (1 + 1e-5) and layer.lipschitz_constant() >= float(norm) * (1 - 1e-9)


def test_flow_log_prob_is_float32_per_sample_nats():
    flow = ResidualFlow(in_shape=(3,), n_blocks=1, hidden=[8], actnorm=False, estimator=ExactLogDet())
    flow.eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()  # g = 0 (up to biases, zeroed too): the flow is the identity
    x = torch.randn(5, 3)
    expected = -0.5 * (x * x).sum(1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(flow.log_prob(x), expected)
