"""The Glow coupling baseline against brute force: log p(x) from the materialised Jacobian of
x -> z (float64), the closed-form inverse, the parameter counts of the shipped configs, and a
few training steps through the density task."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from iresflow import registry
from iresflow.data import Toy2DDataModule
from iresflow.models import GlowFlow, ResidualFlow, standard_normal_log_prob
from iresflow.models.coupling import AffineCoupling, InvertibleLinear, hidden_for_parameter_count, parameter_count
from iresflow.tasks import DensityTask

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _randomised(flow: GlowFlow, x: torch.Tensor, scale: float = 0.3) -> GlowFlow:
    """Non-trivial couplings (their last layer starts at zero) and ActNorm initialised on ``x``."""
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, AffineCoupling):
                last = m.net[-1]
                last.weight.normal_(0, scale)
                last.bias.normal_(0, scale)
    flow.train()
    flow.log_prob(x)
    return flow.eval()


def _brute_force_log_prob(flow, x: torch.Tensor) -> torch.Tensor:
    out = []
    for xi in x:
        def f(t):
            return flow.forward_and_logdet(t.view(1, *flow.in_shape))[0].flatten()

        z = f(xi.flatten())
        jac = torch.autograd.functional.jacobian(f, xi.flatten())
        out.append(standard_normal_log_prob(z.view(1, -1))[0] + torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def test_vector_glow_log_prob_matches_brute_force():
    torch.manual_seed(0)
    flow = GlowFlow(in_shape=(5,), n_steps=3, hidden=16).double()
    x = torch.randn(6, 5, dtype=torch.float64) * 2
    _randomised(flow, x)
    torch.testing.assert_close(flow.log_prob(x), _brute_force_log_prob(flow, x), rtol=0, atol=1e-10)


def test_image_glow_log_prob_matches_brute_force():
    """Logit transform, squeezes, ActNorms, 1x1 convolutions, couplings and a factor-out."""
    torch.manual_seed(0)
    flow = GlowFlow(in_shape=(2, 4, 4), n_steps=2, hidden=8, n_scales=2).double()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 0.98 + 0.01
    _randomised(flow, x)
    ref = _brute_force_log_prob(flow, x)
    torch.testing.assert_close(flow.log_prob(x), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(2,), (7,), (1, 8, 8), (3, 8, 8)])
def test_glow_inverse_reproduces_the_input(shape):
    torch.manual_seed(0)
    flow = GlowFlow(in_shape=shape, n_steps=4, hidden=16, n_scales=2)
    x = torch.rand(8, *shape) * 0.98 + 0.01 if len(shape) == 3 else torch.randn(8, *shape)
    _randomised(flow, x)
    z, _ = flow.forward_and_logdet(x)
    assert z.shape == (8, math.prod(shape))
    assert (flow.inverse(z) - x).abs().max().item() < 1e-5
    samples = flow.sample(4, temperature=0.5)
    assert samples.shape == (4, *shape) and torch.isfinite(samples).all()


def test_invertible_linear_log_det_and_inverse():
    torch.manual_seed(0)
    layer = InvertibleLinear(6).double()
    w = layer.weight()
    # a rotation (made in float32)
    torch.testing.assert_close(w @ w.t(), torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    with torch.no_grad():
        layer.log_s.add_(torch.randn(6, dtype=torch.float64) * 0.5)
        layer.upper.add_(torch.randn(6, 6, dtype=torch.float64))
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    y, logdet = layer.forward_and_logdet(x)
    expected = torch.linalg.slogdet(layer.weight()).logabsdet * 20
    torch.testing.assert_close(logdet, expected.expand(3))
    torch.testing.assert_close(layer.inverse(y), x)


def test_coupling_scales_are_bounded():
    layer = AffineCoupling(4, hidden=8, image=False, scale_bound=2.0)
    with torch.no_grad():
        layer.net[-1].bias.fill_(1e4)
    _, logdet = layer.forward_and_logdet(torch.randn(5, 4))
    assert torch.isfinite(logdet).all() and (logdet <= 2 * 2.0 + 1e-5).all()
    with pytest.raises(ValueError, match="splits the channels"):
        AffineCoupling(1, hidden=8, image=False)


def test_glow_builder_reports_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        GlowFlow(in_shape=(1, 28, 28), n_scales=3)
    with pytest.raises(ValueError, match="in_shape"):
        GlowFlow(in_shape=(2, 2))


def _model_node(name: str) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))
    return node


def test_shipped_glow_fc_matches_flow_fc_in_size():
    glow = registry.build_node("model", _model_node("glow_fc"), in_shape=(2,))
    resflow = registry.build_node("model", _model_node("flow_fc"), in_shape=(2,))
    assert isinstance(glow, GlowFlow) and isinstance(resflow, ResidualFlow)
    n_glow, n_res = parameter_count(glow), parameter_count(resflow)
    assert (n_glow, n_res) == (44320, 44890)
    assert abs(n_glow / n_res - 1) < 0.02


@pytest.mark.slow
def test_shipped_glow_multiscale_size_on_cifar():
    """The note in configs/model/glow_multiscale.yaml against the models themselves, and
    flow_multiscale's count against its formula: per block 9 c h + h + h^2 + h + 9 h c + c weights
    and biases, ActNorm's 2 c, and one learnable LipSwish beta per activation (the 3-1-3 g has 3)."""
    import re

    with torch.device("meta"):
        glow = registry.build_node("model", _model_node("glow_multiscale"), in_shape=(3, 32, 32))
    resflow = registry.build_node("model", _model_node("flow_multiscale"), in_shape=(3, 32, 32))
    node = _model_node("flow_multiscale")
    h, blocks, c, formula = node["hidden"], node["n_blocks"], 3, 0
    for s in range(node["n_scales"]):
        c = c if s == 0 else 2 * c
        formula += blocks * (9 * c * h + h + h * h + h + 9 * h * c + c + 2 * c + 3)
    assert parameter_count(resflow) == formula
    note = (CONFIGS / "model" / "glow_multiscale.yaml").read_text().replace(",", "")
    n_glow, n_res = map(int, re.search(r"on 3x32x32 (\d+) parameters against flow_multiscale's (\d+)", note).groups())
    assert (parameter_count(glow), parameter_count(resflow)) == (n_glow, n_res)
    assert abs(n_glow / n_res - 1) < 0.02


def test_hidden_for_parameter_count_matches_a_residual_flow():
    torch.manual_seed(0)
    resflow = ResidualFlow(in_shape=(1, 8, 8), n_blocks=2, hidden=32, n_scales=2)
    target = parameter_count(resflow)
    hidden = hidden_for_parameter_count(target, (1, 8, 8), n_steps=4, n_scales=2)
    counts = {h: parameter_count(GlowFlow((1, 8, 8), n_steps=4, hidden=h, n_scales=2))
              for h in (hidden - 1, hidden, hidden + 1)}
    assert abs(counts[hidden] - target) == min(abs(n - target) for n in counts.values())
    assert abs(counts[hidden] / target - 1) < 0.05


def test_a_few_training_steps_through_the_density_task(tmp_path):
    torch.manual_seed(0)
    dm = Toy2DDataModule("8gaussians", batch_size=128, train_size=128 * 30, val_size=256, test_size=256)
    model = GlowFlow(in_shape=(2,), n_steps=4, hidden=32)
    task = DensityTask(model, dims=(2,), data_kind="vector", n_bits=None, n_samples=200, picture_every_n_val=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm.setup()
    x_val = dm._val.tensors[0]
    with torch.no_grad():
        model.train()
        model.log_prob(x_val[:128])  # ActNorm initialised as the first step would
        nll_before = -float(model.eval().log_prob(x_val).mean())
    model.train()
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    trainer.test(task, datamodule=dm, verbose=False)
    nll = trainer.callback_metrics["test/nll"].item()
    assert math.isfinite(nll) and nll < nll_before - 0.1  # it learned something in 30 steps
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert trainer.callback_metrics["test/recon_error"].item() < 1e-4  # the exact inverse
    assert (tmp_path / "density.png").is_file()
