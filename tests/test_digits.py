"""The digits datamodule: shapes, the 17 levels, the fixed split, bits/dim for 17 levels, and the
series log-det estimators against the exact log-det at 64 dimensions on real digit images."""

import math

import pytest
import torch

from iresflow import registry
from iresflow.data.digits import DIGITS_LEVELS, DigitsDataModule, load_digit_levels
from iresflow.models import ResidualFlow
from iresflow.nn.logdet import ExactLogDet, PowerSeriesLogDet, RussianRouletteLogDet

pytest.importorskip("sklearn", reason="the digits need scikit-learn (pip install 'iresflow[digits]')")


def _batch(dm, split="train", n=None):
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    xs, ys = zip(*[(x, y) for x, y in loader])
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if n is None else (x[:n], y[:n])


def test_the_raw_data_are_1797_images_in_17_levels():
    levels, labels = load_digit_levels()
    assert levels.shape == (1797, 1, 8, 8) and levels.dtype == torch.uint8
    assert int(levels.min()) == 0 and int(levels.max()) == DIGITS_LEVELS - 1 == 16
    assert len(torch.unique(levels)) == 17
    assert sorted(torch.unique(labels).tolist()) == list(range(10))


def test_density_batches_are_dequantised_levels():
    dm = DigitsDataModule(task="density", batch_size=100)
    dm.setup("fit")
    assert dm.dims == (1, 8, 8) and dm.data_kind == "image" and dm.dequantized
    assert dm.n_bits == pytest.approx(math.log2(17))
    levels, _ = load_digit_levels()
    x, _ = _batch(dm, "test")
    assert x.shape == (360, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    # x = (level + u) / 17: the level is recovered by flooring, and u is not constant
    recovered = torch.floor(x * 17).to(torch.uint8)
    torch.testing.assert_close(recovered, levels[dm.split(1797)[2]], rtol=0, atol=0)
    noise = x * 17 - recovered
    assert 0.4 < float(noise.mean()) < 0.6 and float(noise.std()) > 0.25
    # evaluation noise is fixed per image; training noise is fresh
    torch.testing.assert_close(_batch(dm, "test")[0], x, rtol=0, atol=0)
    a, b = dm.train_set[0][0], dm.train_set[0][0]
    assert not torch.equal(a, b) and torch.equal(torch.floor(a * 17), torch.floor(b * 17))


def test_flattened_vectors_for_the_fc_flow():
    dm = DigitsDataModule(task="density", flatten=True)
    dm.setup()
    x, _ = dm.train_set[0]
    assert dm.dims == (64,) and dm.data_kind == "vector" and x.shape == (64,)


def test_classification_batches():
    dm = DigitsDataModule(task="classification", batch_size=2000)
    dm.setup()
    assert dm.num_classes == 10 and not dm.dequantized
    x, y = _batch(dm, "train")
    assert x.shape == (1437, 1, 8, 8) and y.dtype == torch.long
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    # the labels belong to the images: the class means differ (a 0 is not a 1)
    assert not torch.allclose(x[y == 0].mean(0), x[y == 1].mean(0), atol=0.3)


def test_split_sizes_and_determinism():
    a = DigitsDataModule(val_split=0.1, seed=0)
    b = DigitsDataModule(val_split=0.1, seed=0)
    c = DigitsDataModule(val_split=0.1, seed=1)
    ta, va, sa = a.split(1797)
    assert (len(ta), len(va), len(sa)) == (1293, 144, 360)
    assert not set(ta) & set(va) and not set(ta) & set(sa) and not set(va) & set(sa)
    assert sorted(ta + va + sa) == list(range(1797))
    assert (ta, va, sa) == b.split(1797)
    tc, vc, sc = c.split(1797)
    assert sc == sa          # the test split does not depend on the run seed ...
    assert vc != va          # ... the validation split does
    assert DigitsDataModule(split_seed=3).split(1797)[2] != sa
    d = DigitsDataModule()   # val_split 0: validation is the test set
    d.setup()
    assert d.val_is_test and d.val_set is d.test_set and len(d.train_set) == 1437


def test_bits_per_dim_offset_is_log2_17():
    """A uniform density on [0, 1)^64 gives every 17-level image probability 17^-64: exactly
    log2(17) = 4.087 bits per dimension (an 8-bit offset would report 8)."""
    dm = registry.build_node("data", {"name": "digits"}, task="density")

    class Uniform(torch.nn.Module):
        def log_prob(self, x):
            return x.new_zeros(x.shape[0])

    task = registry.build("task", "density", model=Uniform(), dims=dm.dims, data_kind=dm.data_kind,
                          n_bits=dm.n_bits)
    x = torch.rand(5, 1, 8, 8)
    bpd = task._bpd(task.log_prob(x))
    discrete = -math.log2(DIGITS_LEVELS ** -64) / 64
    torch.testing.assert_close(bpd, torch.full((5,), discrete), rtol=0, atol=1e-6)
    assert discrete == pytest.approx(4.08746, abs=1e-5)
    assert task.report_bpd and task.n_bits == pytest.approx(math.log2(17))


def test_missing_scikit_learn_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"iresflow\[digits\]"):
        DigitsDataModule().setup()


def _flow_logdet(flow, x, estimator_factory, repeats):
    """``repeats`` estimates of the whole flow's log-det per image (every block with a fresh estimator)."""
    for b in flow.blocks:
        b.estimator = estimator_factory()
    with torch.no_grad():
        return torch.stack([flow.forward_and_logdet(x)[1] for _ in range(repeats)])


@pytest.fixture(scope="module")
def trained_digit_flow():
    """A 64-d flow trained for 150 steps on the digits (Russian roulette), in float64, and 16 test images."""
    from iresflow.nn.lipschitz import update_lipschitz

    torch.manual_seed(0)
    dm = DigitsDataModule(task="density", flatten=True)
    dm.setup()
    train = torch.stack([dm.train_set[i][0] for i in range(512)])
    flow = ResidualFlow(in_shape=(64,), n_blocks=2, hidden=[64], coeff=0.9,
                        estimator=RussianRouletteLogDet(n_terms=2))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    flow.train()
    for _ in range(150):
        loss = -flow.log_prob(train[torch.randint(0, 512, (64,))]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_lipschitz(flow, 1)
    flow = flow.double()
    update_lipschitz(flow, 100)
    x = torch.stack([dm.test_set[i][0] for i in range(16)]).double()
    return flow.eval(), x


def _z_scores(flow, x, make, repeats=300):
    exact = _flow_logdet(flow, x, ExactLogDet, 1)[0]
    error = _flow_logdet(flow, x, make, repeats) - exact  # [repeats, images]
    stderr = error.std(0) / math.sqrt(repeats)
    return error.mean(0) / stderr, error.std(0)


@pytest.mark.parametrize("make", [lambda: PowerSeriesLogDet(n_terms=16),
                                  lambda: RussianRouletteLogDet(n_terms=2, eval_n_terms=2)],
                         ids=["power_series_16", "russian_roulette"])
def test_series_estimators_agree_with_the_exact_log_det_on_real_digits(trained_digit_flow, make):
    flow, x = trained_digit_flow
    blocks = sum(ExactLogDet()(b.g, x)[1].detach() for b in flow.blocks[:1])
    assert float(blocks.abs().min()) > 0.1  # training made the residual blocks' log-det matter
    z, std = _z_scores(flow, x, make)
    assert (z.abs() <= 4).all(), z
    assert float(std.mean()) > 1e-3  # a stochastic estimate, not the exact value in disguise


def test_a_one_term_series_is_detectably_biased_on_the_same_images(trained_digit_flow):
    """The check above has power: the truncated series with one term is many errors off."""
    flow, x = trained_digit_flow
    z, _ = _z_scores(flow, x, lambda: PowerSeriesLogDet(n_terms=1))
    assert float(z.abs().max()) > 6
