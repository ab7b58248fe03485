"""The ``iresflow`` command and the run folder contract: train / resume / refuse, W&B offline,
eval, sample, registry list, config show, errors and exit codes, every experiment on fake data."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from iresflow.cli import main
from iresflow.run import RunDirError, evaluate, sample, train
from iresflow.config import load_config

# A tiny real 2D flow (exact log-det), registered by a plugin file: it also exercises the
# `plugins` config key. It takes **ignored so that the flow_fc config's other keys pass.
STUB_PLUGIN = textwrap.dedent('''
    from iresflow.models import ResidualFlow
    from iresflow.nn.logdet import ExactLogDet
    from iresflow.registry import register

    @register("model", "cli_test_stub_flow", description="test stand-in: 2 blocks, exact log-det")
    def stub(in_shape=(2,), **ignored):
        return ResidualFlow(in_shape=in_shape, n_blocks=2, hidden=[8], coeff=0.9, actnorm=False,
                            estimator=ExactLogDet())
''')


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "stub_flow.py").write_text(STUB_PLUGIN)
    return folder


def _tiny_toy(plugin_dir, out, *extra):
    """Overrides for a seconds-long toy run with the stand-in model."""
    return [f"plugins=[{plugin_dir}]", "model.name=cli_test_stub_flow", f"output_dir={out}",
            "data.batch_size=50", "data.train_size=100", "data.val_size=100", "data.test_size=100",
            "task.n_samples=200", "trainer.max_steps=4", "trainer.check_val_every_n_epoch=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
            "logger=csv", *extra]


# --------------------------------------------------------------------------- commands and errors

@pytest.mark.parametrize("command", [["train"], ["eval"], ["sample"], ["sweep"], ["reproduce"], ["registry", "list"],
                                     ["config", "show"], []])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: iresflow" in capsys.readouterr().out


def test_sweep_command_dry_run(tmp_path, capsys):
    """`iresflow sweep SPEC --dry-run` lists the runs; overrides may follow the options."""
    spec = os.path.join(os.path.dirname(__file__), "..", "sweeps", "coeff.yaml")
    assert main(["sweep", spec, "--dry-run", "--out", str(tmp_path / "s"), "trainer.max_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "sweep coeff (grid): 5 runs" in out
    assert [ln.split()[2] for ln in out.splitlines() if ln.startswith("[")] == \
        [f"model.coeff={c}" for c in ("0.5", "0.6", "0.7", "0.8", "0.9")]
    assert out.count("trainer.max_epochs=2 ") == 5 and not (tmp_path / "s").exists()
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2


def test_rank_from_the_launchers_environment(monkeypatch):
    from iresflow.run.paths import rank as _rank

    for var in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "LOCAL_RANK", "NODE_RANK",
                "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert _rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # lightning's launcher on the second node: not rank 0
    assert _rank() > 0
    monkeypatch.setenv("SLURM_PROCID", "0")  # srun: the global rank
    assert _rank() == 0
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert _rank() == 3


def test_config_show_and_registry_list(capsys):
    assert main(["config", "show", "model.coeff=0.5", "data=fake"]) == 0
    out = capsys.readouterr().out
    assert "coeff: 0.5" in out and "name: fake" in out
    assert main(["registry", "list", "data"]) == 0
    out = capsys.readouterr().out
    assert "toy2d" in out and "batch_size=" in out and "[data]" in out
    assert main(["registry", "list"]) == 0
    assert "[task]" in capsys.readouterr().out


def test_bad_overrides_exit_with_a_suggestion(capsys):
    assert main(["train", "model.coef=0.5"]) == 2
    assert "model.coeff" in capsys.readouterr().err
    assert main(["train", "data=mnsit"]) == 2
    assert "'mnist'" in capsys.readouterr().err
    assert main(["config", "show", "trainer.max_step=3"]) == 2
    assert "trainer.max_steps" in capsys.readouterr().err


def test_unknown_task_or_trainer_parameter_is_an_error(plugin_dir, tmp_path, capsys):
    assert main(["train", *_tiny_toy(plugin_dir, tmp_path / "a", "+task.learning_rate=1")]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", *_tiny_toy(plugin_dir, tmp_path / "b", "+trainer.max_step=1")]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_missing_data_names_the_files(tmp_path, capsys):
    code = main(["train", "experiment=mnist_classify", f"data.root={tmp_path}", "logger=none",
                 f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1  # bad input: one line
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


# --------------------------------------------------------------------------- the run folder

def test_train_writes_the_run_folder_resumes_and_refuses(plugin_dir, tmp_path):
    out = tmp_path / "run"
    metrics = train(load_config(_tiny_toy(plugin_dir, out))).metrics
    for name in ("config.yaml", "metrics.json", "status.json", "checkpoints/last.ckpt", "density.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["trainer/global_step"] == 4 == metrics["trainer/global_step"]
    assert {"train/nll", "val/nll", "test/nll", "val/recon_error"} <= set(on_disk)
    assert all(isinstance(v, float) for v in on_disk.values())
    assert "output_dir: " + str(out) in (out / "config.yaml").read_text()

    # a second fresh run into the same folder is refused ...
    with pytest.raises(RunDirError, match="ckpt_path=auto"):
        train(load_config(_tiny_toy(plugin_dir, out)))
    # ... resuming for more steps is a change of settings, asked for and recorded
    config_before = (out / "config.yaml").read_text()
    metrics = train(load_config(_tiny_toy(plugin_dir, out, "ckpt_path=last", "trainer.max_steps=8",
                                          "resume_changes=allow"))).metrics
    assert metrics["trainer/global_step"] == 8
    assert (out / "config.yaml").read_text() == config_before
    assert "trainer.max_steps" in (out / "changes.yaml").read_text()
    import csv

    rows = list(csv.DictReader((out / "csv" / "version_1" / "metrics.csv").read_text().splitlines()))
    steps = [int(r["step"]) for r in rows if r.get("train/nll")]
    assert steps and min(steps) >= 4  # the resumed run logged steps 4.. only
    # overwrite=true replaces the folder
    metrics = train(load_config(_tiny_toy(plugin_dir, out, "overwrite=true"))).metrics
    assert metrics["trainer/global_step"] == 4 and not (out / "csv" / "version_1").exists()
    assert not (out / "changes.yaml").exists()


def test_ckpt_path_last_without_output_dir_finds_the_newest_run(plugin_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in _tiny_toy(plugin_dir, "x") if not a.startswith("output_dir")]
    train(load_config([*args, "name=findme"]))
    (run,) = list((tmp_path / "runs" / "findme").iterdir())
    metrics = train(load_config([*args, "name=findme", "ckpt_path=last", "trainer.max_steps=6",
                                 "resume_changes=allow"])).metrics
    assert metrics["trainer/global_step"] == 6
    assert list((tmp_path / "runs" / "findme").iterdir()) == [run]


def test_wandb_offline_run_holds_the_metrics_and_resumes_the_same_run(plugin_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    base = [a for a in _tiny_toy(plugin_dir, out) if a != "logger=csv"] + ["logger=wandb", "logger.group=g1"]
    train(load_config(base))
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    (run_dir,) = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    keys = (b"train/nll", b"val/nll", b"test/nll", b"pictures/density")
    # The run file is written by wandb's service process; on a loaded machine its
    # last records can land a moment after wandb.finish() returns.
    for _ in range(40):
        data = (run_dir / f"run-{run_id}.wandb").read_bytes()
        if all(key in data for key in keys):
            break
        time.sleep(0.25)
    for key in keys:
        assert key in data, key
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    train(load_config([*base, "ckpt_path=last", "trainer.max_steps=6", "resume_changes=allow"]))
    assert (out / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert not [p for p in (out / "wandb").glob("offline-run-*") if not p.name.endswith(run_id)]


def test_eval_and_sample_commands(plugin_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(_tiny_toy(plugin_dir, out)))
    ckpt = out / "checkpoints" / "last.ckpt"
    result = evaluate(str(ckpt))
    assert "test/nll" in result.metrics and result.path == out / "eval_last.json" and result.path.is_file()
    assert main(["eval", f"ckpt={ckpt}", f"out={tmp_path / 'e.json'}", "data.test_size=50"]) == 0
    assert "test/nll" in json.loads((tmp_path / "e.json").read_text())
    path = sample(str(ckpt), 100)
    assert path.is_file() and path.suffix == ".png"
    assert main(["sample", f"ckpt={ckpt}", "n=16", f"out={tmp_path / 's.png'}"]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["eval", f"ckpt={tmp_path / 'nope.ckpt'}"]) == 2


# --------------------------------------------------------------------------- real models

TINY_FLOW_IMAGE = ["model.n_scales=2", "model.n_blocks=1", "model.hidden=8"]
TINY_CLASSIFIER = ["model.stages=[[1, 4], [1, 8]]"]


@pytest.mark.parametrize("experiment", ["toy2d_density", "mnist_density", "cifar10_density", "mnist_classify",
                                        "cifar10_classify", "cifar100_classify"])
def test_every_experiment_runs_a_few_steps_on_cpu(experiment, tmp_path):
    common = [f"experiment={experiment}", f"output_dir={tmp_path / 'run'}", "logger=none", "trainer=cpu",
              "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false"]
    if experiment == "toy2d_density":
        extra = ["model.n_blocks=2", "model.hidden=[8, 8]", "data.batch_size=32", "data.train_size=64",
                 "data.val_size=32", "data.test_size=32", "task.n_samples=64"]
    else:
        channels = 1 if experiment.startswith("mnist") else 3
        n_classes = 100 if "100" in experiment else 10
        extra = ["data=fake", f"data.image_size=[{channels}, 8, 8]", f"data.num_classes={n_classes}",
                 "data.size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4"]
        extra += TINY_CLASSIFIER if "classify" in experiment else [*TINY_FLOW_IMAGE, "task.n_samples=4"]
    metrics = train(load_config(common + extra)).metrics
    assert metrics["trainer/global_step"] == 2
    key = "test/acc" if "classify" in experiment else ("test/nll" if "toy" in experiment else "test/bpd")
    assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_default_train_command_writes_its_picture(tmp_path, capsys):
    out = tmp_path / "default"
    code = main(["train", f"output_dir={out}", "logger=none", "trainer.max_steps=20",
                 "trainer.check_val_every_n_epoch=1", "data.train_size=1000", "data.val_size=200",
                 "data.test_size=500", "task.n_samples=500", "trainer.enable_progress_bar=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test/nll" in printed and f"picture: {out / 'density.png'}" in printed
    assert (out / "density.png").is_file() and (out / "metrics.json").is_file()


@pytest.mark.slow
def test_default_run_as_users_type_it(tmp_path):
    """`iresflow train` exactly as the README says (a few minutes), in a fresh process."""
    env = {**os.environ, "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "iresflow", "train", f"output_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/nll"] < 3.5  # 8 Gaussians: a standard normal fit scores ~4.3 nats
    assert (tmp_path / "run" / "density.png").is_file()


@pytest.mark.parametrize("argv", [["train", "a=1", "--debug", "b=2"], ["eval", "a=1", "--ckpt", "x.ckpt", "b=2"],
                                  ["sample", "a=1", "-n", "4", "b=2"], ["config", "show", "a=1", "b=2"]])
def test_key_values_after_an_option_are_overrides_too(argv):
    from iresflow.run.commands import parser

    assert parser().parse_args(argv).overrides == ["a=1", "b=2"]
