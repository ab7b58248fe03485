"""The training recipe's options: near-identity init of g (``last_init_scale``) and the
optimiser's betas and weight decay, from the config to the built modules."""

import pytest
import torch
from omegaconf import OmegaConf

from iresflow import registry
from iresflow.config import ConfigError, load_config
from iresflow.models import ResidualFlow
from iresflow.nn.residual import MLPResidual


def _mlp(scale, **kw):
    torch.manual_seed(0)
    return MLPResidual(2, hidden=(16, 16), coeff=0.97, last_init_scale=scale, **kw)


def test_scaled_last_map_gives_s_times_the_default_g():
    """``g_s(x) = s (W_L h(x) + b_L)`` with ``h`` and ``W_L`` those of the default init (same seed):
    the layers before the last are untouched and the last one is below c, so not rescaled."""
    s = 1e-3
    base, scaled = _mlp(1.0).eval(), _mlp(s).eval()
    for a, b in zip(list(base.net)[:-1], list(scaled.net)[:-1]):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    last = base.net[-1]
    x = torch.randn(64, 2, dtype=torch.float64)
    with torch.no_grad():
        h = base.net[:-1].double()(x)
        expected = s * (h @ last.weight.double().t() + last.bias.double())
        got = scaled.double()(x)
    # (float32 rounding of s W_L: ~1e-7 relative, cancellations in the sum included)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    # The stored sigma is that of the scaled matrix, checked against its exact spectral norm.
    true_sigma = torch.linalg.matrix_norm(scaled.net[-1].weight.detach().double(), ord=2)
    assert float(scaled.net[-1].sigma) == pytest.approx(float(true_sigma), rel=1e-3)


def test_tiny_last_map_makes_the_flow_near_the_identity():
    """``s = 1e-6``: each ``g`` moves a point by at most ``s`` times the default ``g``'s output, so
    ``z ~ x`` and the log-det (exact estimator) matches ``slogdet`` of the flow's Jacobian,
    materialised by autograd in float64, and is ~0."""
    node = {"name": "mlp", "last_init_scale": 1e-6}
    torch.manual_seed(0)
    flow = ResidualFlow((2,), n_blocks=3, hidden=(16, 16), actnorm="none",
                        residual=registry.factory("residual", node),
                        estimator=registry.factory("estimator", {"name": "exact"})).double().eval()
    x = torch.randn(16, 2, dtype=torch.float64)
    z, logdet = flow.forward_and_logdet(x)
    def one(v):
        return flow.forward_and_logdet(v[None])[0][0]

    jac = torch.stack([torch.autograd.functional.jacobian(one, xi) for xi in x])
    torch.testing.assert_close(z.detach(), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(logdet.detach(), torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)
    assert logdet.abs().max() < 1e-5


def test_zero_scale_is_refused_for_a_normalised_map():
    with pytest.raises(ValueError, match="1e-3"):
        _mlp(0.0)
    with pytest.raises(ValueError, match="last_init_scale"):
        _mlp(2.0)


def _optimizer(cfg, params):
    node = OmegaConf.to_container(cfg.task.optimizer, resolve=True)
    return registry.factory("optimizer", node)(params=params)


def test_optimizer_betas_and_weight_decay_reach_torch():
    p = [torch.nn.Parameter(torch.zeros(3))]
    cfg = load_config(["task.optimizer.betas=[0.8,0.95]", "task.optimizer.weight_decay=2e-5"])
    group = _optimizer(cfg, p).param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.95)
    assert group["weight_decay"] == 2e-5
    # The defaults of the main job are what the config file says.
    default = load_config([])
    group = _optimizer(default, p).param_groups[0]
    assert tuple(group["betas"]) == tuple(default.task.optimizer.betas)
    assert group["weight_decay"] == default.task.optimizer.weight_decay


def test_schema_accepts_the_init_scale_and_refuses_a_word():
    cfg = load_config(["model.residual.last_init_scale=0.01"])
    assert cfg.model.residual.last_init_scale == 0.01
    with pytest.raises(ConfigError):
        load_config(["model.residual.last_init_scale=small"])
