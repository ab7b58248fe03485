"""Config composition and overrides: groups, experiments, keys, errors that suggest."""

import re

import pytest
from omegaconf import OmegaConf

from iresflow import registry
from iresflow.config import (ConfigError, GROUPS, apply_overrides, config_dir, group_options, load_config,
                             parse_value)

EXPERIMENTS = ["toy2d_density", "mnist_density", "cifar10_density", "mnist_classify", "cifar10_classify",
               "cifar100_classify"]


def test_default_is_the_toy_density_run():
    cfg = load_config([])
    assert cfg.data.name == "toy2d" and cfg.task.name == "density"
    assert cfg.model.name == "iresnet_flow" and cfg.model.estimator.name == "russian_roulette"
    assert cfg.logger.name == "wandb" and cfg.experiment is None
    assert cfg.output_dir is None and cfg.ckpt_path is None
    # interpolations are resolved: data.seed follows seed
    assert load_config(["seed=7"]).data.seed == 7


def test_every_group_file_and_experiment_composes():
    for group in GROUPS[:-1]:
        for name in group_options(group):
            cfg = load_config([f"{group}={name}"])
            assert cfg[group] is not None
    assert set(EXPERIMENTS) <= set(group_options("experiment"))
    for name in EXPERIMENTS:
        cfg = load_config([f"experiment={name}"])
        assert cfg.experiment == name and cfg.name == name
        assert cfg.task.name == ("classification" if "classify" in name else "density")


def test_experiment_sets_groups_and_command_line_groups_win():
    cfg = load_config(["experiment=mnist_classify"])
    assert (cfg.data.name, cfg.model.name, cfg.task.name) == ("mnist", "iresnet_classifier", "classification")
    assert cfg.task.optimizer.name == "sgd" and cfg.task.optimizer.lr == 0.1 and cfg.task.gamma == 0.2
    assert cfg.task.optimizer.momentum == 0.9  # from the task group, merged under the experiment's node
    cfg = load_config(["experiment=mnist_classify", "data=fake", "logger=none"])
    assert cfg.data.name == "fake" and cfg.logger.name == "none"
    assert cfg.data.batch_size == 128  # the experiment's body still applies


def test_key_overrides_and_value_parsing():
    cfg = load_config(["model.coeff=0.5", "task.optimizer.lr=1e-3", "trainer.max_steps=5",
                       "seed=3", "model.hidden=[8, 8]", "trainer.devices=2", "+task.extra=null"])
    assert cfg.model.coeff == 0.5 and cfg.task.optimizer.lr == 1e-3 and isinstance(cfg.task.optimizer.lr, float)
    assert cfg.trainer.max_steps == 5 and cfg.seed == 3 and list(cfg.model.hidden) == [8, 8]
    assert load_config(["data=mnist", "data.root=/tmp/x"]).data.root == "/tmp/x"
    assert "extra" in cfg.task and cfg.task.extra is None
    assert parse_value("1e-3") == 1e-3 and parse_value("10") == 10 and parse_value("true") is True
    assert parse_value("null") is None and parse_value("'007'") == "007" and parse_value("a/b") == "a/b"
    assert parse_value("[1, 2e-1]") == [1, 0.2]


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"model\.coeff"):
        load_config(["model.coef=0.5"])
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        load_config(["trainer.max_step=5"])
    with pytest.raises(ConfigError, match=r"\+model\.new_key"):
        load_config(["model.new_key=1"])
    with pytest.raises(ConfigError, match="already exists"):
        load_config(["+model.coeff=1"])


def test_unknown_group_or_group_file_suggests():
    with pytest.raises(ConfigError, match="'mnist'"):
        load_config(["data=mnsit"])
    with pytest.raises(ConfigError, match="mnist_classify"):
        load_config(["experiment=mnist_clasify"])
    with pytest.raises(ConfigError, match="'data'"):
        load_config(["dat=mnist"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["model.coeff"])


@pytest.fixture
def scratch_estimator():
    """A registered estimator with a parameter set of its own."""
    name = "test_series_only"

    @registry.register("estimator", name, description="test only", override=True)
    def series(n_terms: int = 5, trace=None, gradient: str = "backprop"):
        return None

    yield name
    registry._REGISTRY["estimator"].pop(name, None)


def test_switching_a_component_keeps_only_what_it_accepts(scratch_estimator):
    cfg = load_config([f"model.estimator.name={scratch_estimator}", "model.estimator.n_terms=8"])
    node = OmegaConf.to_container(cfg.model.estimator)
    assert node == {"name": scratch_estimator, "n_terms": 8, "gradient": "neumann",
                    "trace": {"name": "hutchinson", "n_probes": 1, "probe": "gaussian"}}
    # the shorthand model.estimator=NAME does the same
    cfg = load_config([f"model.estimator={scratch_estimator}"])
    assert set(cfg.model.estimator) == {"name", "n_terms", "trace", "gradient"}
    with pytest.raises(ConfigError, match="russian_roulette|Available"):
        load_config(["model.estimator.name=rusian_roulette"])


def test_n_terms_means_the_exact_terms_for_every_series_estimator():
    """One key, one meaning: switching the estimator keeps ``n_terms`` and both build with it."""
    from iresflow import registry

    for name in ("power_series", "russian_roulette"):
        cfg = load_config(["model.estimator.n_terms=7", f"model.estimator.name={name}"])
        node = dict(cfg.model.estimator)
        assert node["n_terms"] == 7
        est = registry.build_node("estimator", node).train()
        n, weights = est._plan()
        assert n >= 7 and weights[1:8] == [1.0] * 7  # the first 7 terms are exact, unweighted
        if name == "power_series":
            assert n == 7


def test_apply_overrides_on_a_stored_config():
    cfg = load_config([])
    apply_overrides(cfg, ["data.batch_size=7", "~task.eval_estimator"])
    assert cfg.data.batch_size == 7 and "eval_estimator" not in cfg.task
    with pytest.raises(ConfigError, match="group"):
        apply_overrides(cfg, ["data=mnist"])


def test_config_dir_env(tmp_path, monkeypatch):
    (tmp_path / "train.yaml").write_text("seed: 0\n")
    monkeypatch.setenv("IRESFLOW_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path
    with pytest.raises(ConfigError, match="no data config"):
        load_config([])


# --------------------------------------------------------------------------- typed values

def test_values_are_checked_against_their_keys_types():
    from iresflow.config import ConfigError

    cfg = load_config(["model.coeff=1", "trainer.limit_val_batches=0.5", "model.hidden=16", "threads=2",
                       "task.eval_estimator=exact", "data=mnist", "data.root=2024", "data.val_split=0.1"])
    assert cfg.model.coeff == 1.0 and isinstance(cfg.model.coeff, float)   # an int where a float goes
    assert cfg.data.root == "2024" and cfg.data.val_split == 0.1           # text kept as typed; a fraction
    assert cfg.trainer.limit_val_batches == 0.5 and cfg.model.hidden == 16 and cfg.threads == 2
    for override, message in [("model.coeff=abc", "model.coeff takes a number, not the text 'abc'"),
                              ("trainer.max_steps=ten", "trainer.max_steps takes a whole number"),
                              ("trainer.max_steps=1.5", "trainer.max_steps takes a whole number, not 1.5"),
                              ("model.actnorm=3",
                               "model.actnorm takes 'before', 'after', 'input_and_after', 'none' or true or false"),
                              ("data.batch_size=[1]", "takes a whole number"),
                              ("model.hidden=abc", "model.hidden takes a whole number or a list"),
                              ("checkpoint=5", "checkpoint takes a mapping"),
                              ("trainer.logger=true", "trainer.logger is set by iresflow")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config([override])


def test_experiment_files_are_typed_too(tmp_path, monkeypatch):
    import shutil

    from iresflow.config import ConfigError

    root = tmp_path / "configs"
    shutil.copytree(config_dir(), root)
    (root / "experiment" / "bad.yaml").write_text("trainer:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match="trainer.max_steps takes a whole number"):
        load_config(["experiment=bad"], root=root)
    (root / "experiment" / "bad.yaml").write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="trainer.max_stepz is not a lightning Trainer argument.*max_steps"):
        load_config(["experiment=bad"], root=root)


def test_the_trainer_table_matches_lightning():
    """iresflow.schema knows Trainer's arguments without importing Lightning; it must know all of them."""
    import inspect

    from lightning.pytorch import Trainer

    from iresflow.schema import TRAINER_ARGUMENTS

    assert set(TRAINER_ARGUMENTS) == set(inspect.signature(Trainer.__init__).parameters) - {"self"}


def test_renamed_optimizer_keys_say_where_they_went():
    from iresflow.config import ConfigError

    for key in ("lr", "weight_decay", "momentum", "betas", "nesterov"):
        with pytest.raises(ConfigError, match=f"task.{key} is now task.optimizer.{key}"):
            load_config([f"task.{key}=1"])
    cfg = load_config(["task.optimizer=sgd"])  # switching the optimiser keeps what SGD accepts
    assert dict(cfg.task.optimizer) == {"name": "sgd", "lr": 3e-3, "weight_decay": 1e-5}
