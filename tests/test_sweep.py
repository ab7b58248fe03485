"""``iresflow sweep``: W&B-compatible expansion (grid order, random draws), the local runner
(failures, resume, GPU pinning), summaries and plots, the --wandb guard, and the repo's specs.

A tiny fake program stands in for ``iresflow train`` so these tests take seconds; two slow
tests run toy sweeps through the real command. Faults (signals, kills, resume, a locked
folder) are in test_sweep_faults.py."""

import csv
import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from iresflow import sweep
from iresflow.sweep import SweepError, expand, format_args, load_spec, main, plan, render_command
from test_sweep_faults import needs_train_with_ckpt_auto

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "sweeps"

# Writes <output_dir>/metrics.json with score = (x - 0.3)^2 (+1 for mode=b); fails on x=0.7.
# Every start is appended to calls.txt (to see which runs a rerun starts) and the GPU it saw.
# Like iresflow train it refuses a non-empty folder unless resuming (ckpt_path=auto) or asked to.
FAKE_PROGRAM = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out = Path(args["output_dir"])
    with open(Path(__file__).with_name("calls.txt"), "a") as f:
        f.write(json.dumps({"args": sys.argv[1:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "group": os.environ.get("WANDB_RUN_GROUP")}) + "\\n")
    x = float(args.get("x", 0))
    if abs(x - 0.7) < 1e-9:
        print("training step 3 ...")
        print("error: boom at x=0.7 (non-finite loss)", file=sys.stderr)
        sys.exit(3)
    in_place = args.get("ckpt_path") == "auto" or args.get("overwrite") == "True"
    out.mkdir(parents=True, exist_ok=in_place)
    score = (x - 0.3) ** 2 + (1.0 if args.get("mode") == "b" else 0.0)
    (out / "metrics.json").write_text(json.dumps({"score": score, "time/fit_seconds": 0.01}))
''')


@pytest.fixture
def fake(tmp_path):
    """A spec factory around the fake program; returns (make_spec, tmp_path)."""
    prog = tmp_path / "fake_train.py"
    prog.write_text(FAKE_PROGRAM)

    def make(parameters, method="grid", name="toy", **extra):
        spec = {"name": name, "method": method, "metric": {"name": "score", "goal": "minimize"},
                "program": str(prog), "parameters": parameters,
                "command": ["${interpreter}", "${program}", "${args_no_hyphens}"], **extra}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return make, tmp_path


def _calls(tmp_path):
    f = tmp_path / "calls.txt"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


# --------------------------------------------------------------------------- expansion

def test_coeff_dry_run_lists_five_runs(tmp_path, capsys):
    assert main([str(SWEEPS / "coeff.yaml"), "--dry-run", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "5 runs" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert len(lines) == 5
    for line, c in zip(lines, ["0.5", "0.6", "0.7", "0.8", "0.9"]):
        assert f"model.coeff={c} " in line
    commands = [ln.strip() for ln in out.splitlines() if " -m iresflow train " in ln]
    assert len(commands) == 5
    assert all("experiment=cifar10_classify" in c and "logger.group=coeff" in c for c in commands)
    assert not (tmp_path / "s").exists()  # a dry run starts and writes nothing


def test_grid_order_is_wandb_order():
    # W&B sorts parameter names; the first name varies slowest; constants ride along.
    spec = {"method": "grid", "parameters": {"b": {"values": [1, 2]}, "a": {"values": ["x", "y"]},
                                             "c": {"value": 9}}}
    configs = expand(spec)
    assert [(c["a"], c["b"]) for c in configs] == [("x", 1), ("x", 2), ("y", 1), ("y", 2)]
    assert all(list(c) == ["a", "b", "c"] and c["c"] == 9 for c in configs)
    assert format_args(configs[0])["args_no_hyphens"] == ["a=x", "b=1", "c=9"]
    assert len(expand(spec, count=3)) == 3


def test_grid_int_and_q_uniform_nested_and_duplicates():
    spec = {"method": "grid", "parameters": {
        "n": {"distribution": "int_uniform", "min": 1, "max": 3},
        "q": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.5},
        "opt": {"parameters": {"lr": {"values": [0.1, 0.1]}, "name": {"value": "sgd"}}}}}
    configs = expand(spec)
    assert len(configs) == 3 * 2  # duplicate lr dropped, q_uniform = arange(0, 1, 0.5)
    assert [c["n"] for c in configs] == [1, 1, 2, 2, 3, 3]
    assert configs[0]["opt"] == {"lr": 0.1, "name": "sgd"}
    assert format_args(configs[0])["args_no_hyphens"][1] == "opt={'lr': 0.1, 'name': 'sgd'}"
    with pytest.raises(SweepError, match="grid"):
        expand({"method": "grid", "parameters": {"lr": {"distribution": "uniform", "min": 0, "max": 1}}})


def test_random_reproducible_and_within_bounds():
    params = {
        "u": {"distribution": "uniform", "min": -1.0, "max": 2.0},
        "i": {"distribution": "int_uniform", "min": 3, "max": 5},
        "inferred_int": {"min": 1, "max": 4},
        "lv": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "l1": {"distribution": "log_uniform", "min": -3.0, "max": 0.0},
        "inv": {"distribution": "inv_log_uniform_values", "min": 0.1, "max": 10.0},
        "qu": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 2},
        "qlv": {"distribution": "q_log_uniform_values", "min": 1, "max": 1000, "q": 1},
        "nrm": {"distribution": "normal", "mu": 5.0, "sigma": 0.1},
        "lnrm": {"distribution": "log_normal", "mu": 0.0, "sigma": 0.5},
        "bt": {"distribution": "beta", "a": 2.0, "b": 3.0},
        "cat": {"values": ["elu", "lipswish"]},
        "catw": {"values": ["a", "b"], "probabilities": [0.0, 1.0]},
        "const": {"value": 7},
    }
    spec = {"method": "random", "parameters": params}
    a, b = expand(spec, count=200, seed=1), expand(spec, count=200, seed=1)
    assert a == b and expand(spec, count=200, seed=2) != a
    for c in a:
        assert -1 <= c["u"] <= 2 and c["i"] in (3, 4, 5) and c["inferred_int"] in (1, 2, 3, 4)
        assert isinstance(c["i"], int) and isinstance(c["inferred_int"], int)
        assert 1e-4 <= c["lv"] <= 1e-1 and math.exp(-3) <= c["l1"] <= 1
        assert 0.1 <= c["inv"] <= 10 and c["qu"] in (0, 2, 4, 6, 8, 10) and isinstance(c["qu"], int)
        assert 1 <= c["qlv"] <= 1000 and 4.0 < c["nrm"] < 6.0 and c["lnrm"] > 0 and 0 < c["bt"] < 1
        assert c["cat"] in ("elu", "lipswish") and c["catw"] == "b" and c["const"] == 7
    # log-uniform: about half of the draws below the geometric mean
    below = sum(c["lv"] < math.sqrt(1e-4 * 1e-1) for c in a) / len(a)
    assert 0.35 < below < 0.65
    assert {c["cat"] for c in a} == {"elu", "lipswish"}
    with pytest.raises(SweepError, match="--count"):
        expand(spec)


def test_bayes_and_bad_specs_error_clearly(fake, capsys):
    make, tmp = fake
    path = make({"x": {"distribution": "uniform", "min": 0.0, "max": 1.0}}, method="bayes")
    assert main([str(path), "--out", str(tmp / "o")]) == 2
    err = capsys.readouterr().err
    assert "bayes" in err and "--wandb" in err and "random" in err
    bad = tmp / "bad.yaml"
    bad.write_text("method: grid\nparameters: {x: {distribution: gaussian, mu: 0}}\n")
    with pytest.raises(SweepError, match="unknown distribution"):
        load_spec(bad)
    bad.write_text("method: grid\nparameters: {x: {values: [1]}}\nmetrc: {name: a}\n")
    with pytest.raises(SweepError, match="metrc"):
        load_spec(bad)


def test_render_command_macros(monkeypatch):
    monkeypatch.setenv("SWEEP_TEST_VAR", "hello")
    spec = {"program": "train.py",
            "command": ["${env}", "${interpreter}", "${program}", "--tag=${envvar:SWEEP_TEST_VAR}", "${args}"]}
    cmd = render_command(spec, {"a": 1, "flag": False}, interpreter="py")
    assert cmd[1:] == ["py", "train.py", "--tag=hello", "--a=1", "--flag=False"]
    assert render_command({"command": ["x", "${args_no_boolean_flags}"]}, {"f": True, "g": False}) == ["x", "--f"]
    with pytest.raises(SweepError, match="unknown macro"):
        render_command({"command": ["${nope}"]}, {})


def test_overrides_fix_parameters_and_change_ids(fake, tmp_path):
    make, _ = fake
    path = make({"x": {"values": [0.1, 0.2]}, "mode": {"value": "a"}})
    spec = load_spec(path)
    base = plan(spec, tmp_path / "o")
    assert [r.config["x"] for r in base] == [0.1, 0.2]
    fixed = plan(sweep.apply_overrides(spec, ["x=0.5", "steps=300", "root=data/x"]), tmp_path / "o")
    assert len(fixed) == 1 and fixed[0].config["x"] == 0.5 and fixed[0].config["steps"] == 300
    assert "root=data/x" in fixed[0].command
    more = plan(sweep.apply_overrides(spec, ["steps=300"]), tmp_path / "o")
    assert {r.run_id for r in more}.isdisjoint({r.run_id for r in base})  # other settings: other folders
    assert [r.run_id.split("_")[0] for r in more] == ["x-0.1", "x-0.2"]
    assert plan(spec, tmp_path / "o")[0].run_id == base[0].run_id  # stable


def test_command_line_overrides_may_follow_options(fake, capsys):
    make, tmp = fake
    path = make({"x": {"values": [0.1, 0.2]}})
    assert main([str(path), "--dry-run", "--out", str(tmp / "o"), "x=0.5", "--seed", "1", "steps=3"]) == 0
    out = capsys.readouterr().out
    assert "1 runs" in out and "x=0.5" in out and "steps=3" in out
    assert main([str(path), "--dry-run", "=0.5"]) == 2
    assert "key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not key=value: argparse's usage error
        main([str(path), "--dry-run", "bad"])


# --------------------------------------------------------------------------- running

def test_failure_is_recorded_and_rerun_skips_finished(fake, capsys):
    make, tmp = fake
    path = make({"x": {"values": [0.1, 0.3, 0.7]}, "mode": {"values": ["a", "b"]}})
    out = tmp / "sweep_out"
    assert main([str(path), "--out", str(out), "--parallel", "2", "--metrics", "time/fit_seconds"]) == 1
    assert len(_calls(tmp)) == 6
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 6
    by = {(r["x"], r["mode"]): r for r in rows}
    assert by[("0.7", "a")]["status"] == "failed" and "boom" in by[("0.7", "a")]["error"]
    assert by[("0.3", "a")]["status"] == "finished" and float(by[("0.3", "a")]["score"]) == 0.0
    assert float(by[("0.1", "b")]["score"]) == pytest.approx(1.04)
    assert all(float(r["wall_time_s"]) > 0 for r in rows)
    md = (out / "summary.md").read_text()
    assert "| mode | x | score | time/fit_seconds | status |" in md  # W&B order: names sorted
    assert md.count("failed: error: boom") == 2 and "## Failed runs" in md and "training step 3" in md
    assert "**0**" in md  # the best run is marked
    assert (out / "summary.png").stat().st_size > 5000
    assert all(c["group"] == "toy" for c in _calls(tmp))
    assert all("logger.group=toy" in c["args"] for c in _calls(tmp))

    # rerun: the four finished runs are skipped, the two failed ones start again
    capsys.readouterr()
    assert main([str(path), "--out", str(out)]) == 1
    calls = _calls(tmp)[6:]
    assert len(calls) == 2 and all("x=0.7" in c["args"] for c in calls)
    assert "4 already finished, 2 to run" in capsys.readouterr().out
    failed_id = next(r["run_id"] for r in rows if r["x"] == "0.7" and r["mode"] == "a")
    log = (out / "logs" / f"{failed_id}.log").read_text()
    assert log.count("===== attempt ") == 2 and "===== attempt 2 " in log and log.count("boom at x=0.7") == 2
    record = json.loads((out / "logs" / f"{failed_id}.json").read_text())
    assert [(a["status"], a["exit_code"]) for a in record["attempts"]] == [("failed", 3), ("failed", 3)]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sorted(r["status"] for r in rows) == ["cached"] * 4 + ["failed"] * 2
    assert all(r["wall_time_s"] for r in rows if r["status"] == "cached")  # kept from the first pass

    # --summary-only starts nothing
    assert main([str(path), "--out", str(out), "--summary-only"]) == 1
    assert len(_calls(tmp)) == 8


def test_unfinished_run_folder_is_resumed_in_place_never_deleted(fake):
    """Every run gets ckpt_path=auto (the program resumes a checkpoint or starts fresh in place);
    --fresh asks the program to start over (overwrite=true); the sweep deletes nothing."""
    make, tmp = fake
    spec = load_spec(make({"x": {"values": [0.1, 0.2]}}))
    out = tmp / "o"
    runs = plan(spec, out)
    assert all(r.extra["ckpt_path"] == "auto" and "ckpt_path=auto" in r.command for r in runs)
    assert all("overwrite" not in r.extra for r in runs)
    fresh = plan(spec, out, fresh=True)
    assert all("ckpt_path" not in r.extra and "overwrite=True" in r.command for r in fresh)
    assert [r.run_id for r in fresh] == [r.run_id for r in runs]  # same folders
    runs[0].output_dir.mkdir(parents=True)
    (runs[0].output_dir / "config.yaml").write_text("half a run\n")   # crashed before its first checkpoint
    result = sweep.run_sweep(runs[:1], name="toy", echo=False).runs[0]
    assert result.status == "finished" and result.metrics["score"] == pytest.approx(0.04)
    assert (runs[0].output_dir / "config.yaml").read_text() == "half a run\n"  # not the sweep's to delete
    for key in ("ckpt_path=last", "output_dir=/tmp/x", "overwrite=true"):  # set per run by the sweep
        with pytest.raises(SweepError, match="--fresh"):
            plan(sweep.apply_overrides(spec, [key]), out)


def test_gpus_pin_one_device_per_worker(fake):
    make, tmp = fake
    path = make({"x": {"values": [0.0, 0.1, 0.2, 0.3]}})
    assert main([str(path), "--out", str(tmp / "o"), "--gpus", "0,1"]) == 0
    gpus = [c["gpu"] for c in _calls(tmp)]
    assert sorted(set(gpus)) == ["0", "1"] and len(gpus) == 4


def test_shards_split_the_runs_and_share_the_folder(fake, capsys):
    """N workers (a SLURM job array) on one sweep folder: every run runs once; the summary
    of each worker lists all runs, the other shards' still pending until they finish."""
    make, tmp = fake
    path = make({"x": {"values": [0.0, 0.1, 0.2, 0.3, 0.4]}})
    out = tmp / "o"
    assert main([str(path), "--out", str(out), "--shard", "1/2", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "shard 1/2 runs 2 of them" in listing and listing.count("another shard's") == 3
    assert _calls(tmp) == []
    assert main([str(path), "--out", str(out), "--shard", "1/2"]) == 0
    assert sorted(c["args"][0] for c in _calls(tmp)) == ["x=0.1", "x=0.3"]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["pending", "finished", "pending", "finished", "pending"]
    assert main([str(path), "--out", str(out), "--shard", "0/2"]) == 0
    assert sorted(c["args"][0] for c in _calls(tmp)) == [f"x=0.{i}" for i in range(5)]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["finished", "cached", "finished", "cached", "finished"]
    for bad in ("2/2", "1", "a/b"):
        assert main([str(path), "--out", str(out), "--shard", bad]) == 2
    assert "0 <= K < N" in capsys.readouterr().err


def test_random_sweep_runs_and_plots_bars_for_categorical(fake):
    make, tmp = fake
    path = make({"mode": {"values": ["a", "b"]}, "x": {"distribution": "uniform", "min": 0.0, "max": 0.5}},
                method="random", name="rnd")
    assert main([str(path), "--out", str(tmp / "r"), "--count", "3", "--seed", "4"]) == 0
    assert len(list(csv.DictReader(open(tmp / "r" / "summary.csv")))) == 3
    # categorical only: a bar chart
    cat = make({"mode": {"values": ["a", "b"]}, "x": {"value": 0.2}}, name="cat")
    assert main([str(cat), "--out", str(tmp / "c")]) == 0
    assert (tmp / "c" / "summary.png").is_file()


def test_missing_program_fails_run_not_sweep(tmp_path):
    spec = {"name": "nope", "method": "grid", "metric": {"name": "m"}, "parameters": {"x": {"values": [1]}},
            "command": [str(tmp_path / "does-not-exist"), "${args_no_hyphens}"]}
    runs = plan(spec, tmp_path / "o")
    results = sweep.run_sweep(runs, echo=False).runs
    assert results[0].status == "failed" and "could not start" in results[0].error
    paths = sweep.write_summary(results, spec, tmp_path / "o")
    assert "png" not in paths and "failed" in paths["md"].read_text()


# --------------------------------------------------------------------------- W&B

def test_wandb_without_key_errors_clearly(fake, monkeypatch, capsys):
    make, tmp = fake
    path = make({"x": {"values": [0.1]}})
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp))
    assert main([str(path), "--wandb"]) == 2
    err = capsys.readouterr().err
    assert "WANDB_API_KEY" in err and "wandb login" in err
    assert _calls(tmp) == []


def test_wandb_without_network_errors_clearly(fake, monkeypatch, capsys):
    make, tmp = fake
    path = make({"x": {"values": [0.1]}})
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    assert main([str(path), "--wandb"]) == 2
    assert "cannot be reached" in capsys.readouterr().err


def test_wandb_sweep_id_joins_without_registering(fake, monkeypatch, capsys):
    """One `wandb agent` per allocation: --sweep-id starts agents for an existing sweep."""
    make, tmp = fake
    path = make({"x": {"values": [0.1]}})
    from iresflow import wandb_env

    monkeypatch.setattr(wandb_env, "api_key_available", lambda: True)
    monkeypatch.setattr(wandb_env, "server_reachable", lambda timeout=2.0: True)
    import wandb

    monkeypatch.setattr(wandb, "sweep", lambda *a, **k: pytest.fail("registered the sweep again"))
    started = []

    class FakeAgent:
        pid = -1

        def __init__(self, cmd, env, **kw):
            started.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeAgent)
    assert main([str(path), "--wandb", "--sweep-id", "abc123", "--entity", "me", "--gpus", "0,1",
                 "--count", "4"]) == 0
    # one agent per GPU, each pinned to its GPU, all on the same sweep (the spec has no project)
    assert [(c[-4:], g) for c, g in started] == [(["agent", "--count", "4", "me/iresflow/abc123"], "0"),
                                                 (["agent", "--count", "4", "me/iresflow/abc123"], "1")]
    assert main([str(path), "--sweep-id", "abc123"]) == 2
    assert "add --wandb" in capsys.readouterr().err


# --------------------------------------------------------------------------- the repo's specs

EXPECTED_RUNS = {"coeff": 5, "coeff_density": 6, "series_length": 10, "ablation_estimator": 3,
                 "ablation_activation": 3, "ablation_solver": 6, "ablation_gradient": 3}


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_repo_specs_are_wandb_specs(name, tmp_path):
    path = SWEEPS / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("# Question:")  # each spec says what it answers
    spec = load_spec(path)
    assert spec["method"] in ("grid", "random") and spec["metric"]["goal"] in ("minimize", "maximize")
    assert spec["command"][-1] == "${args_no_hyphens}" and spec["command"][:2] == ["${env}", "${interpreter}"]
    runs = plan(spec, tmp_path)
    assert len(runs) == EXPECTED_RUNS[name]
    assert len({r.run_id for r in runs}) == len(runs)
    for r in runs:
        args = r.command[r.command.index("train") + 1:]
        assert all("=" in a for a in args) and f"output_dir={r.output_dir}" in args


def test_series_length_grid_values():
    configs = expand(load_spec(SWEEPS / "series_length.yaml"))
    assert [(c["model.estimator.n_terms"], c["model.estimator.name"]) for c in configs][:4] == [
        (1, "power_series"), (1, "russian_roulette"), (2, "power_series"), (2, "russian_roulette")]
    assert sorted({c["model.estimator.n_terms"] for c in configs}) == [1, 2, 4, 8, 16]


# --------------------------------------------------------------------------- the real command

# A stand-in 2D model for the wiring test (a learnable affine flow; `coeff` shrinks its
# initial scale so the swept value reaches the model): loaded through the `plugins` key.
AFFINE_PLUGIN = textwrap.dedent('''
    import math, torch
    from torch import nn
    from iresflow.registry import register

    class AffineFlow(nn.Module):
        def __init__(self, in_shape=(2,), coeff=0.9, **ignored):
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(in_shape[0]))
            self.log_scale = nn.Parameter(torch.full((in_shape[0],), math.log(coeff)))
            self.blocks = []
        def forward_and_logdet(self, x):
            return (x - self.shift) * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(len(x))
        def log_prob(self, x):
            z, ld = self.forward_and_logdet(x)
            return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + ld
        def inverse(self, z):
            return z * torch.exp(self.log_scale) + self.shift
        def sample(self, n, temperature=1.0):
            return self.inverse(temperature * torch.randn(n, self.shift.numel()))

    @register("model", "sweep_test_affine", description="test stand-in")
    def affine(**kw):
        return AffineFlow(**kw)
''')


@pytest.mark.slow
@needs_train_with_ckpt_auto
def test_sweep_through_iresflow_train_with_a_stub_model(tmp_path):
    """The runner and the real `iresflow train` agree on the contract: key=value overrides,
    output_dir per run, logger.group (W&B logger, offline) and metrics.json."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "affine.py").write_text(AFFINE_PLUGIN)
    spec = sweep.apply_overrides(load_spec(SWEEPS / "coeff_density.yaml"), [
        f"plugins=[{tmp_path / 'plugins'}]", "model.name=sweep_test_affine", "task.eval_estimator=null",
        "trainer.max_steps=4", "trainer.check_val_every_n_epoch=1", "data.batch_size=50", "data.train_size=100",
        "data.val_size=100", "data.test_size=100", "task.n_samples=100", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"])
    spec["parameters"]["model.coeff"] = {"values": [0.5, 0.9]}
    out = tmp_path / "sweep"
    runs = plan(spec, out)
    assert all(r.extra["logger.group"] == "coeff_density" for r in runs)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        results = sweep.run_sweep(runs, name="coeff_density", echo=False).runs
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert [r.status for r in results] == ["finished"] * 2, [r.error for r in results]
    for r in results:
        cfg = yaml.safe_load((r.run.output_dir / "config.yaml").read_text())
        assert cfg["model"]["coeff"] == r.config["model.coeff"] and cfg["logger"]["group"] == "coeff_density"
        assert cfg["output_dir"] == str(r.run.output_dir) and math.isfinite(r.metrics["test/nll"])
    assert results[0].metrics["test/nll"] != results[1].metrics["test/nll"]
    paths = sweep.write_summary(results, spec, out)
    assert paths["png"].is_file()


@pytest.mark.slow
@needs_train_with_ckpt_auto
def test_real_toy_sweep_three_runs(tmp_path):
    out = tmp_path / "coeff_toy"
    spec = sweep.apply_overrides(load_spec(SWEEPS / "coeff_density.yaml"), [
        "logger=none", "trainer.max_steps=20", "trainer.check_val_every_n_epoch=1", "data.train_size=2000",
        "data.val_size=200", "data.test_size=500", "model.n_blocks=2", "task.n_samples=200",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
    spec["parameters"]["model.coeff"] = {"values": [0.5, 0.7, 0.9]}
    runs = plan(spec, out)
    results = sweep.run_sweep(runs, name="coeff_toy", parallel=1, echo=False).runs
    assert [r.status for r in results] == ["finished"] * 3, [r.error for r in results]
    for r in results:
        assert (r.run.output_dir / "config.yaml").is_file()
        assert math.isfinite(r.metrics["test/nll"])
        config = yaml.safe_load((r.run.output_dir / "config.yaml").read_text())
        assert config["model"]["coeff"] == r.config["model.coeff"]
    paths = sweep.write_summary(results, spec, out)
    assert paths["png"].is_file() and "test/nll" in paths["md"].read_text()
