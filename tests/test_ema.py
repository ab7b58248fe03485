"""The EMA of the weights (task.ema_decay): the weights evaluated are the averaged ones (against an
average computed by hand from the recorded training weights), the spectral norms are those of the
averaged weights (the exact norm of every applied map within c), validating never changes the
training, and checkpoints, ``iresflow eval`` and ``iresflow sample`` carry the average."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from iresflow.config import load_config
from iresflow.data import Toy2DDataModule
from iresflow.models import ResidualFlow
from iresflow.nn.lipschitz import LipschitzLinear
from iresflow.nn.logdet import ExactLogDet
from iresflow.registry import factory
from iresflow.run import evaluate, sample, train
from iresflow.tasks import DensityTask
from iresflow.tasks.ema import LipschitzEMA

DECAY = 0.6


class Recorder(pl.Callback):
    """The trained parameters after every optimiser step, and what a validation / test batch sees."""

    def __init__(self):
        self.after_step, self.seen, self.training_after_validation = [], {}, []

    @staticmethod
    def _params(module):
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, *args):
        self.after_step.append(self._params(module))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.seen[("val", trainer.global_step)] = self._params(module)
            self.seen[("val_norms", trainer.global_step)] = [
                (torch.linalg.matrix_norm(m.normalized_weight().detach(), ord=2).item(), m.coeff,
                 float(m.sigma), torch.linalg.matrix_norm(m.weight.detach(), ord=2).item())
                for m in module.modules() if isinstance(m, LipschitzLinear)]

    def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.seen["test"] = self._params(module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if any(key[0] == "val" and key[1] == trainer.global_step for key in self.seen if isinstance(key, tuple)):
            self.training_after_validation.append((trainer.global_step, self._params(module)))


def _by_hand(snapshots, upto):
    """theta_ema after ``upto`` steps: the first step copied, then decay * ema + (1 - decay) * theta."""
    ema = None
    for snap in snapshots[:upto]:
        ema = dict(snap) if ema is None else {k: DECAY * ema[k] + (1 - DECAY) * snap[k] for k in snap}
    return ema


def _task(ema_decay=DECAY, lr=0.05, **kw):
    torch.manual_seed(0)
    flow = ResidualFlow(in_shape=(2,), n_blocks=2, hidden=[16], coeff=0.9, estimator=ExactLogDet())
    return DensityTask(flow, dims=(2,), n_samples=50, picture_every_n_val=0, ema_decay=ema_decay,
                       optimizer=factory("optimizer", {"name": "adam", "lr": lr}), **kw)


def _fit(task, tmp_path, steps=6, callbacks=(), val_batches=1.0):
    dm = Toy2DDataModule("8gaussians", batch_size=32, train_size=64, val_size=32, test_size=32)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         default_root_dir=str(tmp_path), num_sanity_val_steps=0, check_val_every_n_epoch=1,
                         limit_val_batches=val_batches, callbacks=list(callbacks))
    torch.manual_seed(1)
    trainer.fit(task, datamodule=dm)
    return trainer, dm


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_validation_and_test_evaluate_the_averaged_weights(tmp_path):
    rec = Recorder()
    task = _task()
    trainer, dm = _fit(task, tmp_path, callbacks=[rec])
    assert any(isinstance(cb, LipschitzEMA) and cb.decay == DECAY for cb in trainer.callbacks)
    validations = sorted(step for key, step in (k for k in rec.seen if isinstance(k, tuple)) if key == "val")
    assert validations == [2, 4, 6]  # 2 batches an epoch
    for step in validations:
        expected = _by_hand(rec.after_step, step)
        assert _max_diff(rec.seen[("val", step)], expected) < 1e-6
        assert _max_diff(rec.seen[("val", step)], rec.after_step[step - 1]) > 1e-3  # not the training weights
    # after each validation the training goes on from its own weights, exactly
    for step, params in rec.training_after_validation:
        assert _max_diff(params, rec.after_step[step - 1]) == 0.0
    trainer.test(task, datamodule=dm, verbose=False)
    assert _max_diff(rec.seen["test"], _by_hand(rec.after_step, 6)) < 1e-6


def test_the_spectral_norms_follow_the_averaged_weights(tmp_path):
    """Every normalised map applied in a validation has an exact operator norm within c, and its
    stored sigma is the averaged weight's norm: the power iterations ran after the swap. Lightning's
    plain EMA callback (the vectors of the training weights on the averaged weights) does not."""
    norms = {}
    for name, callback in (("ours", None), ("plain", EMAWeightAveraging(decay=DECAY, use_buffers=False))):
        rec = Recorder()
        task = _task(ema_decay=DECAY if callback is None else None, lr=0.2)
        _fit(task, tmp_path / name, callbacks=[rec] + ([callback] if callback else []))
        norms[name] = [entry for key, value in rec.seen.items() if key[0] == "val_norms" for entry in value]
    worst = {name: max(applied / coeff for applied, coeff, _, _ in entries) for name, entries in norms.items()}
    print(f"\napplied operator norm / c in validation: with the power iterations after the swap "
          f"{worst['ours']:.6f}, without {worst['plain']:.6f}")
    assert worst["ours"] <= 1 + 1e-4
    for _applied, _coeff, sigma, exact in norms["ours"]:
        assert sigma == pytest.approx(exact, rel=1e-3)
    assert worst["plain"] > worst["ours"]


def test_validating_with_the_average_does_not_change_the_training(tmp_path):
    finals = []
    for val_batches in (0, 1.0):
        rec = Recorder()
        _fit(_task(lipschitz_eval_iterations=0), tmp_path / str(val_batches), callbacks=[rec],
             val_batches=val_batches)
        finals.append(rec.after_step[-1])
    assert _max_diff(finals[0], finals[1]) == 0.0


def _run_args(out, *extra):
    return ["logger=none", f"output_dir={out}", "model.n_blocks=2", "model.hidden=[8]", "data.batch_size=32",
            "data.train_size=64", "data.val_size=32", "data.test_size=32", "task.n_samples=32",
            "task.picture_every_n_val=0", "trainer.max_steps=6", "trainer.check_val_every_n_epoch=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"task.ema_decay={DECAY}",
            "task.eval_estimator={name: exact}", "task.optimizer.lr=0.05", *extra]


def test_checkpoints_eval_and_sample_carry_the_average(tmp_path):
    out = tmp_path / "run"
    result = train(load_config(_run_args(out)))
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    for state in (last, best):  # the average in state_dict, the training weights beside it
        assert {"state_dict", "current_model_state", "averaging_state"} <= set(state)
        params = [k for k in state["state_dict"] if k.endswith("weight") or k.endswith("bias")]
        assert max((state["state_dict"][k] - state["current_model_state"][k]).abs().max().item() for k in params) > 1e-4
    from iresflow.run.evaluation import restore_checkpoint

    _, _, restored = restore_checkpoint(str(out / "checkpoints" / "best.ckpt"), [])
    own = restored.state_dict()
    assert all(torch.equal(own[k], best["state_dict"][k]) for k in best["state_dict"] if "_metrics" not in k)
    # the run's own test (the average swapped in at the end of training) and `iresflow eval` of last.ckpt agree
    evaluated = evaluate(str(out / "checkpoints" / "last.ckpt")).metrics
    assert evaluated["test/nll"] == pytest.approx(result.metrics["test/nll"], abs=1e-5)
    assert sample(str(out / "checkpoints" / "last.ckpt"), 16).is_file()


class SaveInValidation(pl.Callback):
    """A checkpoint in the middle of the first validation, as a stop signal writes it."""

    def __init__(self, path):
        self.path, self.done = path, False

    def on_validation_batch_end(self, trainer, module, *args):
        if not self.done:
            trainer.save_checkpoint(str(self.path), weights_only=False)
            self.done = True


def test_a_checkpoint_written_during_a_validation_keeps_the_roles(tmp_path):
    """In a validation the model holds the average; a checkpoint then (a stop signal's) still stores
    the average as state_dict and the training weights as current_model_state."""
    rec = Recorder()
    path = tmp_path / "mid_validation.ckpt"
    _fit(_task(), tmp_path, steps=2, callbacks=[rec, SaveInValidation(path)])
    state = torch.load(path, weights_only=True)
    averaged, training = _by_hand(rec.after_step, 2), rec.after_step[1]
    assert _max_diff({k: state["state_dict"][k] for k in averaged}, averaged) < 1e-6
    assert _max_diff({k: state["current_model_state"][k] for k in training}, training) == 0.0
    assert int(state["averaging_state"]["n_averaged"]) == 2
