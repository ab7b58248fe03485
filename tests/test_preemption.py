"""Preemption and resume, by signals sent to real ``iresflow train`` processes.

- SIGTERM in the middle of an epoch: a checkpoint at the step it stopped, exit 75, status
  "interrupted"; the same command with ``ckpt_path=auto`` resumes, and the run ends with
  the parameters of an uninterrupted run of the same seed, bit for bit (model, Adam state,
  schedule, loop counters, the toy stream's position in the epoch, the Russian-roulette
  and Hutchinson draws: leaving any of them out changes the result);
- SIGINT: the same with exit 130, and the printed command resumes it;
- SIGKILL after a periodic checkpoint: the stale lock is taken over, the run resumes from
  the checkpoint and ends where the uninterrupted run ends; the steps after the checkpoint
  are lost (and redone);
- SIGTERM in the middle of a validation: the same exact resume;
- SIGUSR1 on SLURM with ``requeue: true``: a checkpoint and ``scontrol requeue``;
- SIGKILL in the middle of writing a checkpoint: the previous one is still whole.

Measured (printed with ``-s``): the resume difference and the steps lost per fault.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap

import pytest

from iresflow.config import load_config
from iresflow.run import train
from run_helpers import (ROOT, checkpoint_step, env, max_difference, run, run_args, start, status,
                         steps_done, wait_for)

STEPS = 30          # 1.5 epochs of 20 batches
DELAY = 0.08        # seconds per training step in the interrupted runs


@pytest.fixture(scope="module")
def reference(plugin_dir, tmp_path_factory):
    """The uninterrupted run (in this process: the same code and seed, no pause per step)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(load_config(run_args(plugin_dir, out, steps=STEPS)))
    assert result.metrics["trainer/global_step"] == STEPS
    return out / "checkpoints" / "last.ckpt"


def _interrupt(plugin_dir, tmp_path, sig, after_steps, *extra):
    """Start a run, send ``sig`` once it has done ``after_steps`` steps; returns (out, args, proc, log)."""
    out, steps_file, log = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "first.log"
    args = run_args(plugin_dir, out, *extra, steps=STEPS, delay=DELAY, steps_file=steps_file)
    proc = start(args, log)
    wait_for(lambda: steps_done(steps_file) >= after_steps or proc.poll() is not None, what="training steps")
    assert proc.poll() is None, log.read_text()[-3000:]
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    return out, args, proc, log, steps_file


@pytest.mark.slow  # two `iresflow train` processes and a reference run: 12-15 s
def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_bit_for_bit(plugin_dir, tmp_path, reference):
    out, args, proc, log, steps_file = _interrupt(plugin_dir, tmp_path, signal.SIGTERM, 7)
    text = log.read_text()
    assert proc.returncode == 75, text[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    stopped_at = checkpoint_step(last)
    assert 7 <= stopped_at < 20  # in the middle of the first epoch: the stream's position matters
    assert stopped_at == steps_done(steps_file)  # the checkpoint holds every step done: none lost
    st = status(out)
    assert st["status"] == "interrupted" and st["exit_code"] == 75 and "ckpt_path=auto" in st["message"]
    assert f"preempted by SIGTERM at step {stopped_at}" in text and "Traceback" not in text
    assert not (out / "metrics.json").exists() and not (out / ".lock").exists()

    resumed = run([*args, "ckpt_path=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_done(steps_file) == STEPS  # the steps before the stop were not run again
    diff = max_difference(last, reference)
    print(f"\n[preemption] SIGTERM at step {stopped_at}/{STEPS}: 0 steps lost; "
          f"max |resumed - uninterrupted| = {diff:.3e}")
    assert diff <= 1e-7
    assert status(out)["status"] == "finished" and status(out)["attempt"] == 2


@pytest.mark.slow
def test_sigterm_while_the_run_is_built_exits_75_and_leaves_nothing_behind(plugin_dir, tmp_path):
    """Preempted before training (data and model being built): exit 75 with the command that starts
    it again, one line, no folder (this start made it) and no stale lock; the printed command runs."""
    out, built, log = tmp_path / "run", tmp_path / "building", tmp_path / "first.log"
    args = run_args(plugin_dir, out, f"+model.build_file={built}", "+model.build_delay=30", steps=3)
    proc = start(args, log)
    wait_for(lambda: built.exists() or proc.poll() is not None, what="the model's build")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, log.read_text()[-3000:]
    last = log.read_text().strip().splitlines()[-1]
    assert "preempted by SIGTERM; no checkpoint yet (training had not started)" in last and "resume with:" in last
    assert not out.exists()
    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[-1] == "ckpt_path=auto"
    done = run([a for a in resume[2:] if "build_delay" not in a and "build_file" not in a])
    assert done.returncode == 0, done.stderr[-3000:]
    assert status(out)["status"] == "finished"


def test_sigterm_during_a_validation_resumes_bit_for_bit(plugin_dir, tmp_path):
    """The stop can land in a validation (here one of 800 batches, after step 20): the checkpoint
    holds the training's random stream, not the validation's, and the run still ends exactly."""

    import torch

    long_validation = "data.val_size=20000"
    out, steps_file, val_file = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "val.txt"
    args = run_args(plugin_dir, out, long_validation, f"+model.val_file={val_file}", "+model.val_delay=0.01",
                    steps=STEPS, delay=0.02, steps_file=steps_file)
    proc = start(args, tmp_path / "log.txt")
    # the validation after step 20 has begun (800 batches of 10 ms or more: it is still running)
    wait_for(lambda: steps_done(steps_file) >= 20 and steps_done(val_file) >= 5, what="the first validation")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    val = state["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["current"]["completed"]
    assert 0 < val < 800 and state["global_step"] == 20  # stopped in the middle of the validation
    assert run([*args, "ckpt_path=auto"]).returncode == 0
    reference = tmp_path / "reference"
    train(load_config(run_args(plugin_dir, reference, long_validation, steps=STEPS)))
    assert max_difference(out / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt") <= 1e-7


def _both_states_difference(a, b):
    """Largest difference over a checkpoint's averaged weights (state_dict) and training weights."""
    import torch

    sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    diffs = [0.0]
    for key in ("state_dict", "current_model_state"):
        assert sa[key].keys() == sb[key].keys()
        diffs += [float((sa[key][k].double() - sb[key][k].double()).abs().max()) for k in sa[key] if sa[key][k].numel()]
    assert torch.equal(sa["averaging_state"]["n_averaged"], sb["averaging_state"]["n_averaged"])
    return max(diffs)


@pytest.mark.slow  # two `iresflow train` processes and a reference run: 12-15 s
def test_sigterm_with_an_ema_of_the_weights_resumes_bit_for_bit(plugin_dir, tmp_path):
    """With task.ema_decay the checkpoint also holds the average (state_dict) beside the training
    weights (current_model_state) and the average's step count; a run stopped in the middle of an
    epoch and resumed ends with both exactly as the uninterrupted run."""
    ema = "task.ema_decay=0.9"
    reference = tmp_path / "reference"
    train(load_config(run_args(plugin_dir, reference, ema, steps=STEPS)))
    out, args, proc, log, steps_file = _interrupt(plugin_dir, tmp_path, signal.SIGTERM, 7, ema)
    assert proc.returncode == 75, log.read_text()[-3000:]
    stopped_at = checkpoint_step(out / "checkpoints" / "last.ckpt")
    assert run([*args, "ckpt_path=auto"]).returncode == 0
    diff = _both_states_difference(out / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    print(f"\n[preemption] EMA: SIGTERM at step {stopped_at}/{STEPS}; max |resumed - uninterrupted| over the "
          f"averaged and the training weights = {diff:.3e}")
    assert diff <= 1e-7


@pytest.mark.slow  # two `iresflow train` processes and a reference run: 12-15 s
def test_sigint_checkpoints_exits_130_and_the_printed_command_resumes(plugin_dir, tmp_path, reference):
    out, args, proc, log, steps_file = _interrupt(plugin_dir, tmp_path, signal.SIGINT, 5)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert status(out)["status"] == "interrupted" and status(out)["exit_code"] == 130
    command = text.strip().splitlines()[-1].split("resume with: ", 1)[1]
    assert command.startswith("iresflow train ") and f"output_dir={out}" in command
    argv = shlex.split(command)
    resumed = subprocess.run([sys.executable, "-m", "iresflow", *argv[1:]], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_difference(out / "checkpoints" / "last.ckpt", reference) <= 1e-7


@pytest.mark.slow  # two `iresflow train` processes and a reference run: 12-15 s
def test_sigkill_after_a_periodic_checkpoint_resumes_to_the_uninterrupted_result(plugin_dir, tmp_path, reference):
    """A kill nobody can catch: the periodic checkpoint (every 4 steps here; every 5 minutes by
    default) is what is left, the dead owner's lock is taken over, and the run ends as if never cut."""
    out, steps_file = tmp_path / "run", tmp_path / "steps.txt"
    args = run_args(plugin_dir, out, "checkpoint.every_n_steps=4", steps=STEPS, delay=DELAY, steps_file=steps_file)
    proc = start(args, tmp_path / "first.log")
    last = out / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.is_file() and steps_done(steps_file) >= 10, what="a periodic checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done, saved = steps_done(steps_file), checkpoint_step(last)
    assert saved % 4 == 0 and saved <= done
    assert (out / ".lock").exists() and status(out)["status"] == "running"  # what a kill leaves
    resumed = run([*args, "ckpt_path=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    diff = max_difference(last, reference)
    print(f"\n[preemption] SIGKILL at step {done}: resumed from the checkpoint of step {saved}, "
          f"{done - saved} steps lost (redone); max |resumed - uninterrupted| = {diff:.3e}")
    assert diff <= 1e-7 and steps_done(steps_file) == STEPS + done - saved


FAKE_SCONTROL = textwrap.dedent('''\
    #!/bin/sh
    echo "$@" >> "$SCONTROL_LOG"
''')


@pytest.mark.slow
def test_sigusr1_on_slurm_requeues_the_job_when_asked(plugin_dir, tmp_path):
    """SLURM's warning signal (``--signal=USR1@90``) with ``requeue: true``: a checkpoint at the next
    batch, ``scontrol requeue JOBID``, exit 75; the requeued job resumes with ckpt_path=auto.
    (SLURM is faked: its environment variables and an ``scontrol`` that records its arguments.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "iresflow-test", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SCONTROL_LOG": str(tmp_path / "sc.log"),
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out, steps_file = tmp_path / "run", tmp_path / "steps.txt"
    args = run_args(plugin_dir, out, "requeue=true", steps=STEPS, delay=DELAY, steps_file=steps_file)
    proc = start(args, tmp_path / "log.txt", extra_env=slurm)
    wait_for(lambda: steps_done(steps_file) >= 4 or proc.poll() is not None, what="training steps")
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, (tmp_path / "log.txt").read_text()[-3000:]
    assert (tmp_path / "sc.log").read_text().split() == ["requeue", "4242"]
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == steps_done(steps_file)
    assert not list(out.glob("hpc_ckpt_*.ckpt"))  # one checkpoint: ours
    resumed = run([*args, "ckpt_path=auto"], extra_env=slurm)  # what the requeued job runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "sc.log").read_text().split() == ["requeue", "4242"]  # no second requeue


def test_sigusr1_without_requeue_stops_like_sigterm(plugin_dir, tmp_path):
    out, args, proc, log, steps_file = _interrupt(plugin_dir, tmp_path, signal.SIGUSR1, 3)
    assert proc.returncode == 75, log.read_text()[-3000:]
    assert "preempted by SIGUSR1" in log.read_text()
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == steps_done(steps_file)


WRITER = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from iresflow.run.checkpointing import AtomicCheckpointIO

    path = Path(sys.argv[1])
    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": 0, "weights": torch.zeros(10)}, path)  # a small, whole checkpoint
    big = torch.randn(16, 1024, 1024)  # 64 MB: each later write takes a while
    version = 1
    while True:
        io.save_checkpoint({"version": version, "weights": big}, path)
        version += 1
''')


def test_a_kill_in_the_middle_of_a_checkpoint_write_leaves_the_last_one_whole(tmp_path):
    """SIGKILL while a big checkpoint is being written (its temporary file exists and grows):
    ``last.ckpt`` is still the previous complete checkpoint and loads."""
    import torch

    path = tmp_path / "last.ckpt"
    tmp = tmp_path / ".last.ckpt.tmp-"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env())
    try:
        def mid_write():  # a temporary file between 1 MB and half of the 64 MB written
            return path.is_file() and any(p.name.startswith(tmp.name) and 1e6 < p.stat().st_size < 32e6
                                          for p in tmp_path.iterdir())

        wait_for(mid_write, what="a write in progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(tmp.name)]
    assert partial  # the kill did land in the middle of a write
    state = torch.load(path, weights_only=True)
    assert state["version"] >= 0 and state["weights"].numel() in (10, 16 * 1024 * 1024)
