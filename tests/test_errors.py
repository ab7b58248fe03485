"""Bad input is one line saying what to fix (exit 2), answered before torch loads when the config
alone shows it; numerical trouble fails the run (exit 1) with one line and what was measured."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time

# imported here so that Lightning's log handler is made on the session's stderr, not on one
# test's captured stream (closed after that test)
import lightning.pytorch  # noqa: F401
import pytest

from iresflow.config import load_config
from iresflow.run import main, train
from run_helpers import ROOT, env, run_args, status


@pytest.fixture(scope="module")
def checkpoint(plugin_dir, tmp_path_factory):
    """A real checkpoint of a 2-step toy run."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(load_config(run_args(plugin_dir, out, steps=2)))
    return out / "checkpoints" / "last.ckpt"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def _summary_line(capsys) -> str:
    """A run that trained: Lightning's own progress lines may come first; the error is the last line,
    the only one that is an error, and there is no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(ln.startswith("error") for ln in lines) == 1
    return lines[-1]


# --------------------------------------------------------------------------- before torch

#: (command, what the one line must name)
CONFIG_ERRORS = [
    (["train", "model.coeff=abc"], "model.coeff takes a number, not the text 'abc'"),
    (["train", "trainer.max_steps=ten"], "trainer.max_steps takes a whole number"),
    (["train", "model.coef=0.5"], "'model.coeff'"),
    (["train", "trainer.max_step=3"], "trainer.max_steps"),
    (["train", "data=mnsit"], "'mnist'"),
    (["train", "dat=mnist"], "'data'"),
    (["train", "task.lr=0.1"], "task.optimizer.lr"),
    (["train", "threads=many"], "threads takes 'auto', 'default', a whole number or null"),
    (["train", "checkpoint.every_minutes=soon"], "checkpoint.every_minutes takes a number or null"),
    (["train", "resume_changes=maybe"], "resume_changes takes 'refuse' or 'allow'"),
    (["train", "trainer.callbacks=[]"], "trainer.callbacks is set by iresflow"),
    (["train", "ckpt_path=auto"], "ckpt_path=auto needs output_dir"),
    (["train", "model.coeff"], "expected key=value"),
    (["config", "show", "trainer.devices=[1"], None),  # YAML-ish text: a string, devices accepts one
]

PROBE = textwrap.dedent('''
    import contextlib, io, json, sys
    from iresflow.cli import main
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"]):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
            except SystemExit:
                pass
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        results.append([code, err.getvalue()])
    results.append(sorted(m for m in ("torch", "lightning") if m in sys.modules))
    print(json.dumps(results))
''')


def test_config_errors_are_one_line_exit_2_and_never_load_torch():
    """``--help`` and every error the config alone shows: no torch, no Lightning."""
    commands = [argv for argv, _ in CONFIG_ERRORS]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, expected), (code, err) in zip(CONFIG_ERRORS, results):
        if expected is None:
            assert code == 0, (argv, err)
            continue
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert expected in lines[0], (argv, lines[0])
    assert loaded == []  # neither torch nor lightning was imported for any of them


def _timed(args) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "iresflow", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)
    return time.perf_counter() - start, proc


def test_a_bad_value_is_answered_about_as_fast_as_help():
    """Timed against ``iresflow --help`` in the same test (machine load cancels out): a typo or a
    value of the wrong type is reported in a small multiple of the time ``--help`` takes, far from
    the seconds that loading torch and Lightning costs."""
    helps, errors = [], []
    for _ in range(3):
        t, proc = _timed(["--help"])
        assert proc.returncode == 0
        helps.append(t)
        for args in (["train", "model.coeff=abc"], ["train", "trainer.max_steps=ten"], ["train", "model.coef=1"]):
            t, proc = _timed(args)
            assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
            errors.append(t)
    ratio = statistics.median(errors) / statistics.median(helps)
    print(f"\n[errors] --help {statistics.median(helps):.2f} s, first error {statistics.median(errors):.2f} s "
          f"(ratio {ratio:.2f})")
    assert ratio < 3.0


# --------------------------------------------------------------------------- after torch: building, files

BUILD_ERRORS = [
    (["model.coeff=1.5"], "coeff must lie in (0, 1)"),
    (["model.estimator.gradient=sideways"], "unknown gradient mode 'sideways'"),
    (["model.activation=lipswhish"], "Did you mean 'lipswish'"),
    (["task.optimizer.lr=-1"], "Invalid learning rate"),
    (["+task.optimizer.betaz=[0.9,0.9]"], "did you mean 'betas'"),
    (["data.batch_size=0"], "batch_size must be at least 1"),
    (["trainer.precision=17"], "Precision 17 is invalid"),
    (["data=fake", "model=flow_multiscale", "model.n_scales=0", "data.image_size=[1,4,4]"], "n_scales must be >= 1"),
]


@pytest.mark.parametrize("extra, expected", BUILD_ERRORS, ids=[b[0][-1] for b in BUILD_ERRORS])
def test_values_a_component_refuses_are_one_line_exit_2(plugin_dir, tmp_path, capsys, extra, expected):
    out = tmp_path / "run"
    base = [f"output_dir={out}", "logger=none"] if "data=fake" in extra else run_args(plugin_dir, out, steps=1)
    assert main(["train", *base, *extra]) == 2
    assert expected in _one_line_error(capsys)
    assert not out.exists()


def _truncated(path, tmp_path, name="truncated.ckpt"):
    data = path.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    return tmp_path / name


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_a_damaged_checkpoint_is_one_line_exit_2(plugin_dir, checkpoint, tmp_path, capsys, command, damage):
    if damage == "garbage":
        bad = tmp_path / "garbage.ckpt"
        bad.write_bytes(bytes(range(256)) * 40)
    elif damage == "truncated":
        bad = _truncated(checkpoint, tmp_path)
    else:
        bad = tmp_path / "nowhere.ckpt"
    argv = (["train", *run_args(plugin_dir, tmp_path / "run"), f"ckpt_path={bad}"] if command == "train"
            else [command, f"ckpt={bad}"])
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert str(bad) in line and ("does not exist" in line if damage == "missing" else "checkpoint" in line)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("n", ["0", "-3", "abc", "2.5"])
def test_sample_needs_a_positive_whole_number(checkpoint, capsys, n):
    assert main(["sample", f"ckpt={checkpoint}", f"n={n}"]) == 2
    assert f"n={n}" in _one_line_error(capsys)


def test_a_truncated_mnist_file_is_one_line_exit_2(tmp_path, capsys):
    from test_data import _make_mnist

    _make_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    code = main(["train", "experiment=mnist_classify", f"data.root={tmp_path}", "logger=none",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    line = _one_line_error(capsys)
    assert str(images) in line and "truncated" in line
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IRESFLOW_DEBUG", "1")
    assert main(["train", "model.coeff=1.5", f"output_dir={tmp_path / 'run'}", "logger=none"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


# --------------------------------------------------------------------------- numerical trouble

def test_a_diverging_run_with_skipping_stops_and_says_so(plugin_dir, tmp_path, capsys):
    """task.on_nonfinite=skip on a run that diverges at step 3: it stops after K bad batches in a row
    (exit 1, one line), the skip count is in metrics.json, status.json says failed."""
    out = tmp_path / "run"
    code = main(["train", *run_args(plugin_dir, out, "+model.nan_from=3", "task.on_nonfinite=skip",
                                    "task.max_consecutive_skips=4", steps=50)])
    line = _summary_line(capsys)
    assert code == 1 and "4 batches in a row" in line and "diverged" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train/skipped_batches"] == 4.0
    assert (status(out)["status"], status(out)["exit_code"]) == ("failed", 1)


def test_non_finite_final_metrics_fail_the_run(plugin_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *run_args(plugin_dir, out, "+model.nan_in_eval=true", steps=3)])
    line = _summary_line(capsys)
    assert code == 1 and "non-finite final metrics" in line and "test/nll=nan" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/nll"] == "nan" and metrics["trainer/global_step"] == 3.0  # what was measured
    assert status(out)["status"] == "failed"


def test_an_inverse_that_did_not_converge_fails_the_run(plugin_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *run_args(plugin_dir, out, "model.solver.max_iter=1", steps=3)])
    line = _summary_line(capsys)
    assert code == 1 and "did not converge" in line and "solver_converged" in line
    assert json.loads((out / "metrics.json").read_text())["test/solver_converged"] < 1


def test_a_vanilla_run_reports_its_failed_inverse_without_failing(plugin_dir, tmp_path, capsys):
    """normalization none (the paper's Vanilla) is not invertible by construction: the same
    non-converged inverse is recorded in metrics.json, and the run still finishes (exit 0)."""
    out = tmp_path / "run"
    args = [a for a in run_args(plugin_dir, out, "model.solver.max_iter=1", "model.normalization.name=none",
                                "model.estimator=exact", steps=3) if not a.startswith("model.estimator.n_terms")]
    code = main(["train", *args])
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 0 and status(out)["status"] == "finished"
    assert metrics["test/solver_converged"] < 1 and metrics["test/invertible_by_construction"] == 0.0


def test_a_strict_solver_fails_at_the_first_validation(plugin_dir, tmp_path, capsys):
    """model.solver.strict=true: the first validation's inverse check stops the run (20 steps an
    epoch here), one line, exit 1; not the test after 60 steps of training."""
    out = tmp_path / "run"
    code = main(["train", *run_args(plugin_dir, out, "model.solver.strict=true", "model.solver.max_iter=1",
                                    steps=60)])
    line = _summary_line(capsys)
    assert code == 1 and "did not converge" in line and "strict" in line
    assert status(out)["status"] == "failed"
    assert json.loads((out / "metrics.json").read_text())["trainer/global_step"] == 20.0
