"""The Lightning tasks: units (bits/dim, schedule, optimisers), training mechanics with tiny
real models (exact 2D log-det, fixed-point inverse), non-finite losses, Lipschitz upkeep."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from iresflow.data import FakeDataModule, Toy2DDataModule
from iresflow.models import IResNetClassifier, ResidualFlow
from iresflow.nn.lipschitz import LipschitzLinear
from iresflow.nn.logdet import ExactLogDet
from iresflow import registry
from iresflow.tasks import ClassificationTask, DensityTask, LRSchedule, NonFiniteLossError, bits_per_dim


class StubFlow(ResidualFlow):
    """A tiny real flow (2 blocks, exact 2D log-det, no ActNorm); ``nan`` poisons ``log_prob``."""

    def __init__(self, n_blocks: int = 2, nan: bool = False):
        super().__init__(in_shape=(2,), n_blocks=n_blocks, hidden=[16], coeff=0.9, actnorm=False,
                         estimator=ExactLogDet())
        self.nan = nan

    def log_prob(self, x):
        logp = super().log_prob(x)
        return logp * float("nan") if self.nan else logp


def _trainer(tmp_path, steps=4, **kw):
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                      default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw)


def _toy(**kw):
    return Toy2DDataModule("8gaussians", batch_size=64, train_size=128, val_size=64, test_size=64, **kw)


# --------------------------------------------------------------------------- units

def test_bits_per_dim_reference_values():
    # the uniform density on [0,1]^D (log p = 0) puts 1/256 on every 8-bit value: exactly 8 bits/dim
    d = 3 * 4 * 4
    assert bits_per_dim(torch.zeros(5), d, 8).tolist() == [8.0] * 5
    # a density twice as high everywhere (log p = D log 2) saves exactly one bit per dimension
    assert torch.allclose(bits_per_dim(torch.tensor([d * math.log(2.0)]), d, 8), torch.tensor([7.0]))
    # continuous data: bits/dim are nats/dim over ln 2, no discretisation term
    assert torch.allclose(bits_per_dim(torch.tensor([-2.0 * math.log(2.0)]), 2, None), torch.tensor([1.0]))
    from iresflow.data import bits_per_dim as data_bpd

    logp = torch.randn(7, dtype=torch.float64) * 100
    assert torch.allclose(bits_per_dim(logp, 784, 8), data_bpd(logp, 784, 8))


def test_iresnet_schedule_warmup_and_steps():
    s = LRSchedule("multistep", warmup_steps=10, milestones=[60, 120, 160], gamma=0.2, steps_per_epoch=10)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == 1.0
    assert s(599) == 1.0 and s(600) == pytest.approx(0.2)
    assert s(1200) == pytest.approx(0.04) and s(1600) == pytest.approx(0.008) and s(10**6) == pytest.approx(0.008)
    c = LRSchedule("cosine", total_steps=100)
    assert c(0) == 1.0 and c(50) == pytest.approx(0.5) and c(100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        LRSchedule("cosine")
    with pytest.raises(ValueError, match="multistep"):
        LRSchedule("multistp")


def _optimizer(**node):
    return registry.factory("optimizer", node)


def test_optimizers_are_registered_torch_optimizers():
    p = [nn.Parameter(torch.zeros(3))]
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax,
             "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
    assert set(kinds) <= set(registry.available("optimizer"))
    for name, cls in kinds.items():
        assert type(_optimizer(name=name, lr=0.1)(params=p)) is cls
    sgd = _optimizer(name="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)(params=p)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 5e-4
    adam = _optimizer(name="adam", lr=1e-3, betas=[0.9, 0.99])(params=p)
    assert tuple(adam.defaults["betas"]) == (0.9, 0.99)
    with pytest.raises(registry.RegistryError, match="adamax"):
        _optimizer(name="adamx", lr=0.1)
    with pytest.raises(registry.RegistryError, match="momentum"):
        _optimizer(name="sgd", lr=0.1, momentun=0.9)  # an unknown keyword: the close match


def test_task_builds_its_optimizer_from_the_node():
    """The node of task.optimizer reaches torch.optim unchanged, through the registry's factory."""
    task = registry.build("task", "density", model=StubFlow(),
                          optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3})
    opt = task.configure_optimizers()
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]) == (0.05, 0.5, 1e-3)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in task.parameters()}


def test_task_rejects_bad_settings():
    with pytest.raises(TypeError, match="factory"):
        DensityTask(StubFlow(), optimizer="lbfgs")  # names are resolved by the registry, not the task
    with pytest.raises(ValueError, match="learning rate"):
        DensityTask(StubFlow(), optimizer=_optimizer(name="adam", lr=-1.0))  # found when built, not in fit
    with pytest.raises(ValueError, match="on_nonfinite"):
        DensityTask(StubFlow(), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        DensityTask(StubFlow(), max_consecutive_skips=0)


# --------------------------------------------------------------------------- training mechanics

def test_density_task_trains_evaluates_and_draws(tmp_path):
    torch.manual_seed(0)
    task = DensityTask(StubFlow(), dims=(2,), n_samples=200, optimizer=_optimizer(name="adam", lr=1e-2),
                       eval_estimator=None)
    dm = _toy()
    trainer = _trainer(tmp_path, steps=6, check_val_every_n_epoch=1)
    trainer.fit(task, datamodule=dm)
    m = trainer.callback_metrics
    assert {"train/nll", "val/nll", "val/recon_error"} <= set(m)
    assert "val/bpd" not in m  # continuous data: nats, no bits/dim
    assert float(m["val/recon_error"]) < 1e-4
    assert (tmp_path / "density.png").is_file() and list((tmp_path / "pictures").glob("density_*.png"))
    res = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert math.isfinite(res["test/nll"])


def test_density_task_reports_bits_per_dim_for_images(tmp_path):
    task = DensityTask(StubFlow(), dims=(2,), data_kind="image", n_bits=8)
    x = torch.rand(16, 2)
    logp = task.log_prob(x)
    expected = -(logp - 2 * math.log(256)) / (2 * math.log(2))
    assert torch.allclose(task._bpd(logp), expected) and task.monitor == "val/bpd"


def test_nonfinite_loss_raises_naming_the_step(tmp_path):
    task = DensityTask(StubFlow(nan=True), dims=(2,))
    with pytest.raises(NonFiniteLossError, match=r"step 0 .*no checkpoint"):
        _trainer(tmp_path, steps=3).fit(task, datamodule=_toy())


def test_nonfinite_loss_skip_drops_the_batch(tmp_path):
    model = StubFlow(nan=True)
    before = [p.detach().clone() for p in model.parameters()]
    task = DensityTask(model, dims=(2,), on_nonfinite="skip", picture_every_n_val=0)
    trainer = _trainer(tmp_path, steps=3, limit_train_batches=2, max_epochs=1, limit_val_batches=0)
    trainer.fit(task, datamodule=_toy())
    assert task.skipped_batches == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lipschitz_upkeep_runs_after_every_optimizer_step(tmp_path, monkeypatch):
    calls = []
    task = DensityTask(StubFlow(), dims=(2,), lipschitz_iterations=3, lipschitz_eval_iterations=7,
                       picture_every_n_val=0)
    monkeypatch.setattr(task, "update_lipschitz", lambda n: calls.append(n))
    _trainer(tmp_path, steps=4, check_val_every_n_epoch=1).fit(task, datamodule=_toy())
    assert calls.count(3) == 4  # one call per optimiser step
    assert 7 in calls           # before validation / the final pictures


def test_lipschitz_upkeep_converges_real_layers():
    torch.manual_seed(0)
    layer = LipschitzLinear(6, 6, coeff=0.9)
    task = DensityTask(nn.Sequential(layer), dims=(6,))
    for _ in range(50):
        task.update_lipschitz(1)
    true_sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
    assert float(layer.sigma) == pytest.approx(float(true_sigma), rel=1e-3)


def test_classification_task_accuracy_and_inverse_check(tmp_path):
    dm = FakeDataModule(image_size=(1, 4, 4), num_classes=3, size=32, val_size=16, test_size=16, batch_size=8,
                        task="classification")
    task = ClassificationTask(IResNetClassifier(in_shape=(1, 4, 4), num_classes=3, stages=[[1, 8]]), num_classes=3,
                              top_k=2, optimizer=_optimizer(name="sgd", lr=0.05, momentum=0.9),
                              scheduler="multistep", milestones=[1], warmup_epochs=1)
    trainer = _trainer(tmp_path, steps=8, check_val_every_n_epoch=1)
    trainer.fit(task, datamodule=dm)
    m = trainer.callback_metrics
    assert {"train/loss", "val/acc", "val/acc_top2", "val/loss", "val/recon_error"} <= set(m)
    assert 0.0 <= float(m["val/acc"]) <= float(m["val/acc_top2"]) <= 1.0
    assert float(m["val/recon_error"]) < 1e-4
    res = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert {"test/acc", "test/acc_top2"} <= set(res)
    # the warm-up ran over the first epoch's 4 steps, then the milestone at epoch 1 cut the lr
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.get_last_lr()[0] == pytest.approx(0.05 * 0.1)


# --------------------------------------------------------------------------- numerical trouble

class EveryOtherNaN(StubFlow):
    """A real flow whose loss is NaN on every second training batch."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def log_prob(self, x):
        logp = ResidualFlow.log_prob(self, x)
        if self.training:
            self.calls += 1
            if self.calls % 2 == 0:
                return logp * float("nan")
        return logp


def test_skipping_stops_after_too_many_bad_batches_in_a_row(tmp_path):
    task = DensityTask(StubFlow(nan=True), dims=(2,), on_nonfinite="skip", max_consecutive_skips=3,
                       picture_every_n_val=0)
    with pytest.raises(NonFiniteLossError, match=r"3 batches in a row .*3 skipped in all.*diverged"):
        _trainer(tmp_path, steps=20, limit_val_batches=0).fit(task, datamodule=_toy())
    assert task.skipped_batches == 3


def test_isolated_bad_batches_are_skipped_counted_and_logged(tmp_path):
    """One NaN batch in two never makes two in a row: the run goes on, and the count is logged."""
    task = DensityTask(EveryOtherNaN(), dims=(2,), on_nonfinite="skip", max_consecutive_skips=2,
                       picture_every_n_val=0)
    upkeep = []
    real_update = task.update_lipschitz
    task.update_lipschitz = lambda n: (upkeep.append(n), real_update(n))
    trainer = _trainer(tmp_path, steps=6, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(task, datamodule=_toy())
    assert task.skipped_batches == 3 == float(trainer.callback_metrics["train/skipped_batches"])
    # a skipped batch moves no weight: no power iteration after its step (3 good steps of 6)
    assert upkeep.count(task.lipschitz_iterations) == 3


def test_lipschitz_upkeep_comes_before_any_checkpoint_of_the_step(tmp_path, monkeypatch):
    """The power iterations run right after the optimiser step, before callbacks (a checkpoint at
    the end of a batch must hold weights and singular vectors that belong together)."""
    from lightning.pytorch.callbacks import Callback

    events = []

    class Watch(Callback):
        def on_train_batch_end(self, *args):
            events.append("callback")

    task = DensityTask(StubFlow(), dims=(2,), lipschitz_iterations=2, picture_every_n_val=0)
    monkeypatch.setattr(task, "update_lipschitz", lambda n: events.append("upkeep") if n == 2 else None)
    _trainer(tmp_path, steps=3, limit_val_batches=0, callbacks=[Watch()]).fit(task, datamodule=_toy())
    assert events == ["upkeep", "callback"] * 3


def _roulette_task(**kw):
    model = registry.build("model", "iresnet_flow", in_shape=(2,), n_blocks=2, hidden=[8], actnorm=False,
                           estimator={"name": "russian_roulette", "n_terms": 1,
                                      "trace": {"name": "hutchinson", "n_probes": 1}})
    return DensityTask(model, dims=(2,), n_samples=50, **kw)


def test_validating_does_not_change_the_training(tmp_path):
    """Validation draws (estimator probes, samples for the pictures) come from a stream of their own:
    a run that validates every epoch ends with the parameters of one that never validates. (The extra
    power iterations before a validation do move the singular vectors: they are off here.)"""
    finals = []
    for val_batches in (0, 1):
        torch.manual_seed(7)
        task = _roulette_task(lipschitz_eval_iterations=0)
        dm = Toy2DDataModule("8gaussians", batch_size=32, train_size=64, val_size=32, test_size=32)
        torch.manual_seed(11)
        _trainer(tmp_path / str(val_batches), steps=6, limit_val_batches=val_batches,
                 check_val_every_n_epoch=1).fit(task, datamodule=dm)
        finals.append(torch.cat([p.detach().flatten() for p in task.parameters()]))
    assert len(list((tmp_path / "1" / "pictures").glob("*.png"))) >= 2  # validations ran, and drew
    assert torch.equal(finals[0], finals[1])


# --------------------------------------------------------------------------- diagnostics and sampling

def test_a_failing_lipschitz_bound_is_reported_not_swallowed():
    task = DensityTask(StubFlow(), dims=(2,))
    assert task.block_diagnostics()["lipschitz_max"] <= 0.9 ** 2 + 1e-6
    g = task.blocks()[0].g

    def broken():
        raise ZeroDivisionError("sigma is zero")

    g.lipschitz_bound = broken
    with pytest.raises(ZeroDivisionError):
        task.block_diagnostics()
    del g.lipschitz_bound
    type(g).lipschitz_bound, saved = property(lambda self: (_ for _ in ()).throw(AttributeError)), \
        type(g).lipschitz_bound
    try:  # a residual function that certifies no bound: its block reports none, the others do
        assert "lipschitz_max" not in task.block_diagnostics()
    finally:
        type(g).lipschitz_bound = saved


class _SampleNoTemperature(StubFlow):
    def sample(self, n):
        return super().sample(n)


class _SampleBuggy(StubFlow):
    def sample(self, n, temperature=1.0):
        raise TypeError("a bug inside sample()")


def test_sampling_temperature_is_honoured_or_refused():
    torch.manual_seed(0)
    task = DensityTask(_SampleNoTemperature(), dims=(2,))
    assert task.sample(5).shape == (5, 2)
    with pytest.raises(ValueError, match="temperature"):
        task.sample(5, temperature=0.5)  # never silently at temperature 1
    with pytest.raises(TypeError, match="a bug inside"):
        DensityTask(_SampleBuggy(), dims=(2,)).sample(5, temperature=0.5)  # not retried without it


# --------------------------------------------------------------------------- successors' blocks in the tasks

def test_the_dense_eta_counter_advances_per_optimizer_step(tmp_path):
    """Frozen concatenation weights (freeze_steps) count optimiser steps, not forwards: with two
    batches accumulated per step, the angles stay put for exactly the first 3 of 4 steps."""

    class Angles(pl.Callback):
        def __init__(self):
            self.after = []

        def on_train_batch_end(self, trainer, module, *args):
            self.after.append([m.angle.item() for m in module.modules() if hasattr(m, "angle")])

    torch.manual_seed(0)
    flow = ResidualFlow(in_shape=(2,), n_blocks=1, coeff=0.9, actnorm=False, estimator=ExactLogDet(),
                        residual=registry.factory("residual", {"name": "dense_mlp", "depth": 1, "growth": 4,
                                                               "freeze_steps": 3}))
    start = [m.angle.item() for m in flow.modules() if hasattr(m, "angle")]
    task = DensityTask(flow, dims=(2,), picture_every_n_val=0, optimizer=_optimizer(name="adam", lr=0.05))
    angles = Angles()
    _trainer(tmp_path, steps=4, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[angles]).fit(
        task, datamodule=Toy2DDataModule("8gaussians", batch_size=16, train_size=64, val_size=16, test_size=16))
    layers = [m for m in flow.modules() if hasattr(m, "angle")]
    assert layers and all(int(m.steps) == 4 for m in layers)  # 8 training forwards, 4 steps
    after_steps = angles.after[1::2]  # the batches that ended an optimiser step
    assert after_steps[2] == start and after_steps[3] != start


def test_diagnostics_and_the_test_estimator_see_implicit_blocks():
    from iresflow.nn.implicit import ImplicitBlock

    torch.manual_seed(0)
    flow = ResidualFlow(in_shape=(2,), n_blocks=2, hidden=[8], coeff=0.9, actnorm=False,
                        block=registry.factory("block", "implicit"),
                        estimator=registry.factory("estimator", {"name": "power_series", "n_terms": 3}))
    task = DensityTask(flow, dims=(2,), eval_estimator=registry.factory("estimator", "exact"))
    blocks = task.blocks()
    assert len(blocks) == 2 and all(isinstance(b, ImplicitBlock) for b in blocks)
    x = torch.randn(8, 2)
    z, _ = flow.forward_and_logdet(x)
    flow.inverse(z)
    diag = task.block_diagnostics()
    assert diag["estimator_terms"] == 3.0 and diag["solver_converged"] == 1.0
    assert diag["lipschitz_max"] == pytest.approx(max(b.lipschitz_bound() for b in blocks))
    assert diag["lipschitz_max"] == pytest.approx(max(float(g.lipschitz_bound()) for b in blocks
                                                      for g in (b.g_x, b.g_z)))
    assert diag["invertible_by_construction"] == 1.0
    before = [(b.estimator_x, b.estimator_z) for b in blocks]
    with task.evaluation_estimator():
        assert all(isinstance(e, ExactLogDet) for b in blocks for e in (b.estimator_x, b.estimator_z))
        assert blocks[0].estimator_x is not blocks[0].estimator_z
    assert [(b.estimator_x, b.estimator_z) for b in blocks] == before


@pytest.mark.parametrize("kind", ["density", "classification"])
def test_a_test_run_gives_the_random_generators_back(tmp_path, kind):
    """``trainer.test`` draws (probes, roulette lengths, dequantisation noise), but the generators
    after it are the ones before it (a test after training must not shift what a resumed run draws)."""
    import random

    import numpy as np

    if kind == "density":
        task, dm = DensityTask(StubFlow(), n_samples=16), _toy()
    else:
        model = IResNetClassifier(in_shape=(1, 4, 4), num_classes=3, stages=[(1, 4)], coeff=0.9)
        task = ClassificationTask(model, num_classes=3, top_k=2)
        dm = FakeDataModule(image_size=(1, 4, 4), num_classes=3, size=32, val_size=16, test_size=16,
                            batch_size=16, task="classification")
    torch.manual_seed(3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    _trainer(tmp_path).test(task, datamodule=dm, verbose=False)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    assert task._training_random_state is None  # nothing stale for the next checkpoint
