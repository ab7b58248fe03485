"""Flow layers: round trips, log-dets against brute-force Jacobians, ActNorm's
data-dependent initialisation (also across 2 gloo processes), shape helpers.

References are computed independently of the layers: autograd Jacobians with
``slogdet``, explicit reshape/permute for space-to-depth, hand-written values.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from iresflow.nn.layers import ActNorm, InjectivePad, LogitTransform, Split, Squeeze

torch.set_num_threads(1)
DT = torch.float64


def brute_logdet(fn, x):
    """Per-sample ``log|det J|`` of a per-sample map ``fn``, by autograd and slogdet."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = jacobian(lambda z: fn(z).reshape(-1), xi).reshape(xi.numel(), xi.numel())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        out.append(logabs)
    return torch.stack(out)


def scaled_data(shape, seed=1):
    """Data whose channels have clearly non-zero means and non-unit stds."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    mean = torch.linspace(-2.0, 3.0, c, dtype=DT).view(view)
    std = torch.linspace(0.5, 4.0, c, dtype=DT).view(view)
    return mean + std * torch.randn(shape, generator=gen, dtype=DT)


def initialised_actnorm(x):
    layer = ActNorm(x.shape[1]).double()
    layer.train()
    layer(x)
    return layer.eval()


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 2), (2, 3, 4, 4)])
def test_actnorm_roundtrip(shape):
    x = scaled_data(shape)
    layer = initialised_actnorm(x)
    y = layer(scaled_data(shape, seed=2))
    assert torch.allclose(layer(layer.inverse(y)), y, atol=1e-10, rtol=0)
    x2 = scaled_data(shape, seed=3)
    assert (layer.inverse(layer(x2)) - x2).abs().max() < 1e-10


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 2), (2, 3, 4, 4)])
def test_logit_roundtrip(shape):
    x = torch.rand(shape, dtype=DT).clamp(1e-3, 1 - 1e-3)
    layer = LogitTransform(alpha=0.05)
    assert (layer.inverse(layer(x)) - x).abs().max() < 1e-10


@pytest.mark.parametrize("factor,shape", [(2, (2, 3, 4, 6)), (3, (1, 2, 6, 3))])
def test_squeeze_roundtrip(factor, shape):
    x = torch.randn(shape, dtype=DT)
    layer = Squeeze(factor)
    y = layer(x)
    assert y.shape == (shape[0], shape[1] * factor**2, shape[2] // factor, shape[3] // factor)
    assert torch.equal(layer.inverse(y), x)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 4)])
def test_injective_pad(shape):
    x = torch.randn(shape, dtype=DT)
    layer = InjectivePad(5)
    y, logdet = layer.forward_and_logdet(x)
    assert y.shape == (shape[0], shape[1] + 5, *shape[2:])
    assert torch.equal(y[:, : shape[1]], x)
    assert torch.count_nonzero(y[:, shape[1] :]) == 0
    assert torch.equal(logdet, torch.zeros(shape[0], dtype=DT))
    assert torch.equal(layer.inverse(y), x)


def test_split_merge():
    x = torch.randn(2, 6, 4, 4, dtype=DT)
    layer = Split()
    kept, out = layer.split(x)
    assert torch.equal(kept, x[:, :3]) and torch.equal(out, x[:, 3:])
    assert torch.equal(layer.merge(kept, out), x)
    assert torch.equal(layer.inverse(*layer(x)), x)
    with pytest.raises(ValueError, match="even"):
        layer.split(torch.randn(2, 5, 4, 4))


# ------------------------------------------------------------ log-determinants


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 2)])
def test_actnorm_logdet_matches_jacobian(shape):
    layer = initialised_actnorm(scaled_data(shape))
    assert layer.logscale.abs().min() > 0.1  # a non-trivial scale was set
    x = scaled_data(shape, seed=5)
    y, logdet = layer.forward_and_logdet(x)
    assert logdet.shape == (shape[0],) and logdet.dtype == DT
    assert (logdet - brute_logdet(layer, x)).abs().max() < 1e-10


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 2)])
def test_logit_logdet_matches_jacobian(shape):
    x = torch.rand(shape, dtype=DT)
    layer = LogitTransform(alpha=0.05)
    y, logdet = layer.forward_and_logdet(x)
    assert logdet.shape == (shape[0],) and logdet.dtype == DT
    assert (logdet - brute_logdet(layer, x)).abs().max() < 1e-10


def test_logit_values_by_hand():
    x = torch.tensor([[0.0, 0.5, 1.0]], dtype=DT)
    y, logdet = LogitTransform(alpha=0.05).forward_and_logdet(x)
    ref = torch.log(torch.tensor([0.05 / 0.95, 1.0, 0.95 / 0.05], dtype=DT))
    assert torch.allclose(y[0], ref, atol=1e-12, rtol=0)
    # d y / d x = 0.9 / (s (1 - s)) with s = 0.05, 0.5, 0.95
    ref_ld = torch.log(torch.tensor(0.9 / (0.05 * 0.95) * 0.9 / 0.25 * 0.9 / (0.95 * 0.05), dtype=DT))
    assert torch.allclose(logdet, ref_ld.view(1), atol=1e-12, rtol=0)


def test_squeeze_jacobian_is_permutation():
    x = torch.randn(2, 2, 4, 2, dtype=DT)
    layer = Squeeze(2)
    jac = jacobian(lambda z: layer(z).reshape(-1), x[:1]).reshape(16, 16)
    assert torch.equal(jac.sum(0), torch.ones(16, dtype=DT))
    assert torch.equal(jac.sum(1), torch.ones(16, dtype=DT))
    assert set(jac.unique().tolist()) == {0.0, 1.0}
    assert torch.linalg.slogdet(jac).logabsdet.abs() < 1e-12
    assert torch.equal(layer.forward_and_logdet(x)[1], torch.zeros(2, dtype=DT))


# --------------------------------------------------------------------- Squeeze


def test_squeeze_values_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1, 1, 2, 2]
    y = Squeeze(2)(x)
    # channel i*2 + j holds pixel (i, j)
    assert torch.equal(y, torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1))
    assert torch.equal(y, F.pixel_unshuffle(x, 2))


def test_squeeze_matches_reshape_permute():
    b, c, h, w, f = 2, 3, 4, 6, 2
    x = torch.randn(b, c, h, w)
    ref = x.view(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4).reshape(b, c * f * f, h // f, w // f)
    assert torch.equal(Squeeze(f)(x), ref)


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="divisible"):
        Squeeze(2)(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="divisible"):
        Squeeze(2)(torch.randn(1, 1, 4, 5))


# ------------------------------------------------------ ActNorm initialisation


@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 5, 5)])
def test_actnorm_init_normalises_batch(shape):
    x = scaled_data(shape).float()
    layer = ActNorm(shape[1])
    assert not layer.initialized
    y = layer(x)
    assert layer.initialized
    dims = [0] + list(range(2, len(shape)))
    assert y.mean(dims).abs().max() < 1e-5
    assert (y.std(dims, unbiased=False) - 1).abs().max() < 1e-5


def test_actnorm_flag_in_state_dict_and_no_reinit_after_load():
    layer = ActNorm(3)
    layer(scaled_data((16, 3, 2, 2)).float())
    state = layer.state_dict()
    assert "initialized" in state and bool(state["initialized"])
    assert "initialized" in dict(layer.named_buffers())

    fresh = ActNorm(3)
    fresh.load_state_dict(state)
    fresh.train()
    fresh(100 + 7 * torch.randn(16, 3, 2, 2))  # very different data
    assert torch.equal(fresh.bias, layer.bias)
    assert torch.equal(fresh.logscale, layer.logscale)


def test_actnorm_second_forward_keeps_params():
    layer = ActNorm(3)
    layer(scaled_data((16, 3)).float())
    bias, logscale = layer.bias.clone(), layer.logscale.clone()
    layer(torch.randn(16, 3))
    assert torch.equal(layer.bias, bias) and torch.equal(layer.logscale, logscale)


def test_actnorm_eval_before_init_is_identity_and_inverse_raises():
    layer = ActNorm(3).eval()
    x = torch.randn(4, 3, 2, 2)
    y, logdet = layer.forward_and_logdet(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4))
    assert not layer.initialized
    with pytest.raises(RuntimeError, match="initiali"):
        layer.inverse(y)


def test_actnorm_init_runs_without_grad():
    layer = ActNorm(3)
    x = scaled_data((8, 3, 2, 2)).float().requires_grad_()
    y, logdet = layer.forward_and_logdet(x)
    (y.sum() + logdet.sum()).backward()
    # Had the init been recorded, the params would depend on x and x.grad would vanish.
    assert x.grad is not None and x.grad.abs().min() > 0
    assert layer.bias.grad is not None and layer.logscale.grad is not None


# --------------------------------------------------- ActNorm under DDP (gloo)

DDP_SHAPE = (8, 3, 2, 2)


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = scaled_data(DDP_SHAPE, seed=7)
        halves = ActNorm(DDP_SHAPE[1]).double()
        halves(x.chunk(world)[rank])
        uneven = ActNorm(DDP_SHAPE[1]).double()
        uneven(x[:5] if rank == 0 else x[5:])  # 5 vs 3 samples: sums, not means, are reduced
        torch.save(
            {k: v.detach().clone() for k, v in [
                ("bias", halves.bias), ("logscale", halves.logscale),
                ("bias_uneven", uneven.bias), ("logscale_uneven", uneven.logscale),
            ]},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_actnorm_ddp_matches_global_batch(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)

    ref = ActNorm(DDP_SHAPE[1]).double()
    ref(scaled_data(DDP_SHAPE, seed=7))
    local = ActNorm(DDP_SHAPE[1]).double()
    local(scaled_data(DDP_SHAPE, seed=7)[:4])
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for suffix in ("", "_uneven"):
            assert (res["bias" + suffix] - ref.bias).abs().max() < 1e-10
            assert (res["logscale" + suffix] - ref.logscale).abs().max() < 1e-10
    # The check has teeth: one rank's half alone gives different statistics.
    assert (local.bias - ref.bias).abs().max() > 1e-3
