"""The run folder: one owner at a time, nothing rewritten unless asked, failed starts leave nothing.

Concurrency is tested with real processes: two ``iresflow train`` on one folder, a resume of a
running run, and many processes racing for one stale lock.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

# imported here so that Lightning's log handler is made on the session's stderr, not on one
# test's captured stream (closed after that test)
import lightning.pytorch  # noqa: F401
import pytest
import yaml

from iresflow.config import ConfigError, load_config
from iresflow.run import RunFolderBusy, main, train
from iresflow.run.lock import LOCK_NAME, RunLock
from run_helpers import ROOT, checkpoint_step, env, run, run_args, start, status, steps_done, wait_for


def _snapshot(folder):
    """Every file of a folder with its bytes (what "nothing was rewritten" compares)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(plugin_dir, tmp_path_factory):
    """A finished 6-step run and its files."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = run_args(plugin_dir, out, steps=6)
    train(load_config(args))
    return out, args


# --------------------------------------------------------------------------- one owner at a time

def test_two_starts_on_one_folder_one_runs_the_other_exits_73(tmp_path):
    """The built-in toy model (no plugin: the second start reaches the lock within a second)."""
    import signal

    out = tmp_path / "run"
    args = [f"output_dir={out}", "logger=none", "model.n_blocks=2", "model.hidden=[8]", "trainer.max_steps=100000",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    first = start(args, tmp_path / "first.log")
    try:
        wait_for(lambda: (out / "status.json").is_file() or first.poll() is not None, what="the first run's start")
        second = run(args, timeout=120)
        assert second.returncode == 73
        line = second.stderr.strip().splitlines()
        assert len(line) == 1 and f"pid {first.pid}" in line[0] and "in use" in line[0]
        # a resume of the running run is refused the same way
        resume = run([*args, "ckpt_path=auto"], timeout=120)
        assert resume.returncode == 73 and f"pid {first.pid}" in resume.stderr
        assert first.poll() is None  # both were refused while it ran
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 75
    finally:
        if first.poll() is None:
            first.kill()
    assert status(out)["status"] == "interrupted" and status(out)["pid"] == first.pid
    assert not (out / LOCK_NAME).exists()


def _race(folder, barrier, results):
    barrier.wait()
    try:
        lock = RunLock(folder).acquire()
        results.put(("won", os.getpid()))
        barrier.wait()  # hold the lock until every racer has tried
        lock.release()
    except RunFolderBusy:
        results.put(("busy", os.getpid()))
        barrier.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    racers = 6
    ctx = mp.get_context("fork")
    for trial in range(5):
        folder = tmp_path / f"run{trial}"
        folder.mkdir()
        stale = {"host": socket.gethostname(), "pid": _dead_pid(), "pid_start": "1", "started": "earlier",
                 "token": "stale"}
        (folder / LOCK_NAME).write_text(json.dumps(stale))
        barrier, results = ctx.Barrier(racers), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(folder, barrier, results)) for _ in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        outcomes = sorted(results.get(timeout=5)[0] for _ in range(racers))
        assert outcomes == ["busy"] * (racers - 1) + ["won"], outcomes
        assert not (folder / LOCK_NAME).exists() and not list(folder.iterdir())  # released, no debris


def test_a_lock_held_on_another_host_is_respected(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = {"host": "node-17", "pid": 123, "pid_start": None, "started": "2026-01-01T00:00:00", "token": "x"}
    (out / LOCK_NAME).write_text(json.dumps(other))
    proc = run([f"output_dir={out}", "logger=none"], timeout=60)
    assert proc.returncode == 73
    assert "pid 123 on node-17" in proc.stderr and f"delete {out / LOCK_NAME}" in proc.stderr


# --------------------------------------------------------------------------- nothing rewritten unless asked

def test_a_resume_with_other_settings_is_refused_and_rewrites_nothing(finished, capsys):
    out, args = finished
    before = _snapshot(out)
    code = main(["train", *args, "ckpt_path=auto", "model.coeff=0.8", "trainer.max_steps=9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "model.coeff: 0.97 -> 0.8" in err[0] and "trainer.max_steps: 6 -> 9" in err[0]
    assert "resume_changes=allow" in err[0]
    assert _snapshot(out) == before


def test_an_allowed_change_is_recorded_and_config_yaml_kept(plugin_dir, tmp_path):
    out = tmp_path / "run"
    args = run_args(plugin_dir, out, steps=4)
    train(load_config(args))
    config = (out / "config.yaml").read_bytes()
    result = train(load_config([*args, "ckpt_path=auto", "trainer.max_steps=6", "resume_changes=allow"]))
    assert result.metrics["trainer/global_step"] == 6 and result.attempt == 2
    assert (out / "config.yaml").read_bytes() == config
    (entry,) = yaml.safe_load((out / "changes.yaml").read_text())
    assert entry["attempt"] == 2 and entry["changes"] == {"trainer.max_steps": {"from": 4, "to": 6}}


def test_keys_that_cannot_change_results_may_differ(finished):
    out, args = finished
    before = _snapshot(out)
    result = train(load_config([*args, "ckpt_path=auto", "trainer.enable_progress_bar=true", "data.num_workers=1",
                                "checkpoint.every_minutes=1"]))
    assert "already finished" in result.note and result.metrics["trainer/global_step"] == 6
    assert _snapshot(out) == before  # a finished run resumed with its settings: nothing to do


def test_a_checkpoint_of_another_task_is_refused_before_anything_is_written(plugin_dir, finished, tmp_path):
    out, _ = finished
    other = tmp_path / "classifier"
    cls_args = ["data=fake", "model=classifier", "task=classification", "model.stages=[[1,4]]", "model.init_pad=1",
                "data.image_size=[3,4,4]", "data.size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
                "trainer.max_steps=1", "logger=none", "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false"]
    train(load_config([*cls_args, f"output_dir={other}"]))
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="checkpoint of task 'classification', not of this run's task 'density'"):
        train(load_config([*run_args(plugin_dir, out, steps=6), f"ckpt_path={other / 'checkpoints/last.ckpt'}"]))
    assert _snapshot(out) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="checkpoint of task"):
        train(load_config([*run_args(plugin_dir, fresh), f"ckpt_path={other / 'checkpoints/last.ckpt'}"]))
    assert not fresh.exists()


# --------------------------------------------------------------------------- failed starts

def test_a_failed_start_leaves_nothing_and_its_corrected_rerun_runs(plugin_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(plugin_dir, out, steps=2)
    assert main(["train", *args, "model.coeff=1.5"]) == 2
    assert "coeff" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # a folder made beforehand stays, empty
    assert main(["train", *args, "data.batch_size=0"]) == 2
    assert out.is_dir() and not list(out.iterdir())
    assert main(["train", *args]) == 0
    assert status(out)["status"] == "finished"


def test_auto_starts_afresh_over_an_attempt_that_left_no_checkpoint(plugin_dir, tmp_path):
    """A kill before the first checkpoint leaves config.yaml and status.json, no checkpoint: the same
    command with ckpt_path=auto starts the run again there (today's trap: neither resumable nor rerunnable)."""
    out, steps_file = tmp_path / "run", tmp_path / "steps.txt"
    args = run_args(plugin_dir, out, steps=20, delay=0.2, steps_file=steps_file)
    proc = start(args, tmp_path / "log.txt")
    wait_for(lambda: steps_done(steps_file) >= 1, what="a first step")
    proc.kill()
    proc.wait(timeout=30)
    assert (out / "config.yaml").is_file() and not (out / "checkpoints" / "last.ckpt").exists()
    assert main(["train", *run_args(plugin_dir, out, steps=3), "ckpt_path=auto"]) == 0
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == 3 and status(out)["attempt"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_steps"] == 3


@pytest.mark.parametrize("where", ["under a file", "read-only", "in sysfs"])
def test_an_unwritable_output_dir_is_one_line(plugin_dir, tmp_path, capsys, where):
    if where == "under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
        assert main(["train", *run_args(plugin_dir, out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
    else:
        code, err = _train_in_a_read_only_folder(plugin_dir, tmp_path, sysfs=where == "in sysfs")
        out = err.pop()
        assert code == 2
    assert len(err) == 1 and f"output_dir {out} cannot be written" in err[0]


def _train_in_a_read_only_folder(plugin_dir, tmp_path, sysfs=False):
    """``iresflow train`` as a real process whose ``output_dir`` lies in a folder it may not write.
    An ordinary user gets a folder of mode 0o555. Root writes through modes (CI containers run as
    root), so for root the folder is read-only for everybody: a read-only bind mount in the process's
    own mount namespace (``unshare -m``, the read-only file system a cluster user meets) where that is
    permitted, else a folder in sysfs, where no process, root included, may create anything
    (``sysfs=True``: that folder for anybody, so the fallback is tested on every machine).
    Returns the exit code and the lines of stderr, followed by the ``output_dir``."""
    import shutil

    ro = tmp_path / "ro"
    ro.mkdir()
    bind = f"mount --bind -o ro '{ro}' '{ro}'"
    if sysfs:
        mode = "sysfs"
    elif os.geteuid() != 0:
        mode = "chmod"
    elif shutil.which("unshare") and subprocess.run(["unshare", "-m", "sh", "-c", bind],
                                                    capture_output=True).returncode == 0:
        mode = "unshare"
    else:
        mode = "sysfs"
    out = Path("/sys") / f"iresflow-test-{os.getpid()}" / "run" if mode == "sysfs" else ro / "run"
    cmd = [sys.executable, "-m", "iresflow", "train", *run_args(plugin_dir, out)]
    if mode == "sysfs":
        assert Path("/sys/kernel").is_dir(), "this test needs sysfs at /sys"
    elif mode == "chmod":
        os.chmod(ro, 0o555)
    else:
        cmd = ["unshare", "-m", "sh", "-c", f"{bind} && exec \"$@\"", "sh", *cmd]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(ro, 0o755)
    assert not out.exists()
    return proc.returncode, [*proc.stderr.strip().splitlines(), str(out)]


def test_status_json_while_running_and_after(plugin_dir, tmp_path):
    out, steps_file = tmp_path / "run", tmp_path / "steps.txt"
    proc = start(run_args(plugin_dir, out, steps=6, delay=0.1, steps_file=steps_file), tmp_path / "log.txt")
    wait_for(lambda: steps_done(steps_file) >= 1, what="a first step")
    st = status(out)
    assert st["status"] == "running" and st["pid"] == proc.pid and st["exit_code"] is None
    assert st["host"] == socket.gethostname() and st["attempt"] == 1 and "ckpt_path=auto" in st["message"]
    assert proc.wait(timeout=300) == 0
    st = status(out)
    assert (st["status"], st["exit_code"]) == ("finished", 0)
    assert set(st) == {"status", "exit_code", "message", "attempt", "host", "pid", "updated"}
