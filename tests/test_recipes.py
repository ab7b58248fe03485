"""The successors' experiment files: each composes with its papers' values and trains a few steps on CPU,
shrunk by overrides on fake data of the right shape (as tests/test_cli.py does for the older ones); the
sweep specs over block kinds and over the hybrid lambda expand to the runs they describe."""

import math
from pathlib import Path

import pytest

from iresflow.config import load_config
from iresflow.run import train
from iresflow.run.build import build_components, trainer_kwargs
from iresflow.sweep.expand import expand
from iresflow.sweep.spec import load_spec

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
FAST = ["logger=none", "trainer=cpu", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
FAKE = ["data=fake", "data.size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4", "task.n_samples=4",
        "model.n_scales=2", "model.n_blocks=1", "model.hidden=4"]
SMALL_FC = ["model.n_fc_blocks=1", "model.fc_hidden=[8]"]
SHRUNK = {
    "resflow_mnist": FAKE + SMALL_FC + ["data.image_size=[1, 8, 8]"],
    "resflow_cifar10": FAKE + SMALL_FC + ["data.image_size=[3, 8, 8]"],
    "iresnet_cifar10_density": FAKE + ["data.image_size=[3, 8, 8]"],
    "idensenet_cifar10": FAKE + ["data.image_size=[3, 8, 8]", "model.n_fc_blocks=1", "model.residual.depth=1",
                                 "model.residual.growth=4", "model.fc_residual.depth=1", "model.fc_residual.growth=4"],
    "hybrid_cifar10": FAKE + SMALL_FC + ["data.image_size=[3, 8, 8]", "task.head_hidden=4"],
    "hybrid_digits": ["model.n_blocks=1", "model.hidden=4", "data.batch_size=16", "task.n_samples=4"],
}


def test_the_experiment_files_carry_the_papers_recipes():
    rf = load_config(["experiment=resflow_cifar10"])
    assert (rf.model.factor_out, rf.model.fc_end, rf.model.actnorm, rf.model.n_fc_blocks) == (False, True, "after", 4)
    assert rf.task.ema_decay == 0.999 and trainer_kwargs(rf)["gradient_clip_val"] == 1.0
    assert rf.model.estimator.gradient == "memory_efficient" and rf.model.estimator.n_terms == 2
    assert load_config(["experiment=resflow_mnist"]).model.logit_alpha == 1e-6
    ires = load_config(["experiment=iresnet_cifar10_density"])
    assert ires.task.optimizer.name == "adamax" and ires.model.prior == "learned" and ires.model.squeeze_first
    assert (ires.model.estimator.name, ires.model.estimator.n_terms) == ("power_series", 5)
    dense = load_config(["experiment=idensenet_cifar10"])
    assert dense.model.residual.name == "dense_conv" and dense.model.residual.growth == 172
    assert dense.model.activation == "clipswish" and dense.model.fc_residual.name == "dense_mlp"
    hybrid = load_config(["experiment=hybrid_cifar10"])
    assert hybrid.task.name == "hybrid" and hybrid.data.task == "density" and hybrid.task.head_hidden == 256


@pytest.mark.parametrize("experiment", sorted(SHRUNK))
def test_every_successor_experiment_trains_a_few_steps_on_cpu(experiment, tmp_path):
    overrides = [f"experiment={experiment}", f"output_dir={tmp_path / 'run'}", *FAST, *SHRUNK[experiment]]
    metrics = train(load_config(overrides)).metrics
    assert metrics["trainer/global_step"] == 2
    assert math.isfinite(metrics["test/bpd"]) and metrics["test/solver_converged"] == 1.0
    if experiment.startswith("hybrid"):
        assert 0.0 <= metrics["test/acc"] <= 1.0 and math.isfinite(metrics["test/ce"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_the_shrunk_models_are_what_the_recipes_build():
    cfg = load_config(["experiment=idensenet_cifar10", *FAST, *SHRUNK["idensenet_cifar10"]])
    _, model, task = build_components(cfg)
    assert {type(b.g).__name__ for b in model.blocks} == {"DenseConvResidual", "DenseMLPResidual"}
    assert task.ema_decay == 0.999
    _, model, _ = build_components(load_config(["experiment=resflow_cifar10", *FAST, *SHRUNK["resflow_cifar10"]]))
    assert model._z_shapes == [(12, 4, 4)] and len(model.blocks) == 3  # no factor-out; 2 conv + 1 fc block


def test_the_sweep_specs_cross_what_they_say():
    block = load_spec(SWEEPS / "ablation_block.yaml")["parameters"]
    values = {key: [v["name"] for v in node["values"]] for key, node in block.items() if "values" in node}
    assert values == {"model.block": ["residual", "implicit"], "model.residual": ["mlp", "dense_mlp"]}
    assert block["experiment"]["value"] == "toy2d_density"
    lam = load_spec(SWEEPS / "hybrid_lambda.yaml")["parameters"]
    assert lam["task.density_weight"]["values"] == [0.0, 0.015625, 1.0, 10.0]
    assert lam["experiment"]["value"] == "hybrid_digits"
    assert len(expand(load_spec(SWEEPS / "ablation_block.yaml"))) == 4
    assert len(expand(load_spec(SWEEPS / "hybrid_lambda.yaml"))) == 4
