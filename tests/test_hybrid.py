"""The hybrid task (lambda * log p(x) + log p(y | x)): its loss and gradients equal the sum of the parts
computed independently (the flow's log_prob, the head's cross-entropy), its metrics are what they
claim (recomputed by hand after training), and its heads read the scales they are said to."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from iresflow import registry
from iresflow.data import FakeDataModule
from iresflow.models import ResidualFlow
from iresflow.nn.activations import ELU
from iresflow.nn.logdet import ExactLogDet
from iresflow.registry import factory
from iresflow.tasks import HybridTask
from iresflow.tasks.density import bits_per_dim


def _flow(**kw):
    torch.manual_seed(0)
    return ResidualFlow(in_shape=(1, 4, 4), n_scales=2, n_blocks=1, hidden=4, coeff=0.9, activation=ELU(),
                        estimator=ExactLogDet(), **kw)


def _task(model=None, **kw):
    kw.setdefault("head_hidden", 6)
    return HybridTask(model or _flow(), dims=(1, 4, 4), data_kind="image", n_bits=8, num_classes=3,
                      n_samples=4, picture_every_n_val=0, **kw)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_loss_and_its_gradient_are_the_sum_of_the_parts(weight):
    task = _task(density_weight=weight).double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 1, 0])
    task.train()
    task.losses(x, y)  # ActNorm's initialisation (flow and heads) on this batch
    task.eval()
    params = [p for p in task.parameters() if p.requires_grad]
    parts = task.losses(x, y)
    got = torch.autograd.grad(parts["loss"], params, allow_unused=True)

    log_prob = task.model.log_prob(x)  # the flow alone
    ce = F.cross_entropy(task.head(task.model.forward_pass(x).features), y)  # the head alone
    expected = -weight * log_prob.mean() + ce
    torch.testing.assert_close(parts["loss"], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(parts["log_prob"], log_prob, rtol=0, atol=1e-12)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for a, b, p in zip(got, want, params):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-10, atol=1e-12)
    flow_grads = [g for g, (name, _) in zip(got, task.named_parameters()) if name.startswith("model.")]
    assert (weight == 0) or any(g is not None and g.abs().max() > 0 for g in flow_grads)


def test_heads_read_every_scale_or_the_last():
    flow = _flow()
    assert flow.feature_shapes == [(2, 2, 2), (2, 2, 2)]  # the factored half, then the last scale's output
    assert len(_task(flow).head.heads) == 2
    assert len(_task(_flow(), head="final").head.heads) == 1
    whole = _flow(factor_out=False)
    assert whole.feature_shapes == [(4, 2, 2), (4, 2, 2)]
    with pytest.raises(ValueError, match="per_scale, final"):
        _task(head="middle")
    with pytest.raises(ValueError, match="density_weight"):
        _task(density_weight=-1.0)


def test_training_logs_bits_per_dim_and_accuracy_together(tmp_path):
    torch.manual_seed(0)
    task = _task(density_weight=0.5, optimizer=factory("optimizer", {"name": "adam", "lr": 1e-2}))
    dm = FakeDataModule(image_size=(1, 4, 4), num_classes=3, size=16, val_size=8, test_size=8, batch_size=8)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         default_root_dir=str(tmp_path), num_sanity_val_steps=0, check_val_every_n_epoch=2)
    trainer.fit(task, datamodule=dm)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"train/loss", "train/nll", "train/bpd", "train/ce", "train/acc", "val/bpd", "val/nll", "val/acc",
            "val/ce", "val/loss", "val/recon_error", "val/lipschitz_max"} <= set(m)
    # the last validation ran on the final weights: recompute its numbers by hand
    task.eval()
    xs, ys = zip(*dm.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        logp = task.model.log_prob(x)
        logits = task(x)
    assert m["val/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert m["val/bpd"] == pytest.approx(bits_per_dim(logp, 16, 8).mean().item(), abs=1e-4)
    ce = F.cross_entropy(logits, y).item()
    assert m["val/ce"] == pytest.approx(ce, abs=1e-5)
    assert m["val/loss"] == pytest.approx(0.5 * -logp.mean().item() + ce, abs=1e-4)
    result = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert {"test/bpd", "test/acc", "test/ce", "test/loss"} <= set(result)


def test_registered_and_built_from_the_task_node():
    task = registry.build_node("task", {"name": "hybrid", "density_weight": 0.1, "head": "final"}, model=_flow(),
                               dims=(1, 4, 4), data_kind="image", n_bits=8, num_classes=4)
    assert isinstance(task, HybridTask) and task.density_weight == 0.1 and task.monitor == "val/loss"
    with pytest.raises(ValueError, match="hands out its features"):
        HybridTask(torch.nn.Linear(2, 2), dims=(2,))
