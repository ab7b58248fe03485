"""On a real SLURM scheduler: the documented scripts, submitted with sbatch, under the faults of a cluster.

A one-node cluster (Debian's slurm-wlm and munge; ``scripts/slurm-up`` installs and starts it,
``JobRequeue=1``, ``KillWait=10``) runs ``examples/slurm/train.sbatch`` and
``examples/slurm/sweep-array.sbatch`` -- the files the README shows -- with tiny runs (the fault
tests' toy flow with a pause per step, ``run_helpers``). Each test checks what the scheduler did
(job state, restarts, the exit code) and what the run left (status.json, the checkpoint, the steps
lost) and that the final parameters equal an uninterrupted run's (maximum difference 0).

Without root or apt (no way to install a scheduler) the tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iresflow.config import load_config
from iresflow.run import train
from run_helpers import ROOT, checkpoint_step, max_difference, run_args, status, steps_done, wait_for

pytestmark = pytest.mark.slow

TRAIN = ROOT / "examples" / "slurm" / "train.sbatch"
SWEEP = ROOT / "examples" / "slurm" / "sweep-array.sbatch"
STEPS = 60
DELAY = 0.15      # seconds per training step: 9 s of training, long enough for a signal to land in it
IRESFLOW = f"{sys.executable} -m iresflow"


@pytest.fixture(scope="session")
def cluster():
    # What the tests need: root (scripts/slurm-up installs and starts a one-node cluster as root, and the
    # tests retime jobs with scontrol as its administrator), and slurm-wlm or apt-get to install it.
    missing = (f"they need root to start a one-node cluster and administer it (running as uid {os.geteuid()}; "
               "CI runs them as root)" if os.geteuid() != 0 else
               "they need slurm-wlm installed, or apt-get to install it (neither is on this machine)"
               if shutil.which("slurmctld") is None and shutil.which("apt-get") is None else None)
    if missing and os.environ.get("CI"):  # CI runs as root with apt: there a missing scheduler is a failure
        pytest.fail(f"SLURM tests in CI: {missing}")
    if missing:
        pytest.skip(f"SLURM tests: {missing}")
    done = subprocess.run([str(ROOT / "scripts" / "slurm-up")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"scripts/slurm-up failed: {done.stderr.strip()}"
    return True


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
           "IRESFLOW": IRESFLOW}
    for var in ("IRESFLOW_RUN_DIR", "IRESFLOW_RESUME", "IRESFLOW_DEBUG", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)
    return env


def sbatch(script: Path, args: list[str], *options: str, log: Path) -> str:
    """Submit ``script ARGS`` from the repository root; returns the job id (``<id>`` or ``<id>_<task>``)."""
    done = subprocess.run(["sbatch", "--parsable", f"--output={log}", *options, str(script), *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = {}
    for token in out.split():
        key, _, value = token.partition("=")
        fields.setdefault(key, value)
    return fields


def wait_job(job_id: str, states: tuple[str, ...], timeout: float = 240) -> dict[str, str]:
    record: dict[str, str] = {}

    def reached() -> bool:
        record.update(job(job_id))
        return record.get("JobState") in states

    wait_for(reached, timeout=timeout, what=f"job {job_id} in {states} (now {record.get('JobState')})")
    return record


def _reference(plugin_dir, tmp_path_factory, *extra: str) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(run_args(plugin_dir, out, "checkpoint.every_n_steps=5", *extra, steps=STEPS)))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def reference(plugin_dir, tmp_path_factory):
    return _reference(plugin_dir, tmp_path_factory)


def _train_args(plugin_dir, out: Path, steps_file: Path, *extra: str, delay: float = DELAY) -> list[str]:
    """The script's arguments: OUTPUT_DIR, then the overrides (its own are output_dir, ckpt_path, requeue)."""
    args = run_args(plugin_dir, out, "checkpoint.every_n_steps=5", *extra, steps=STEPS, delay=delay,
                    steps_file=steps_file)
    return [str(out), *[a for a in args if not a.startswith("output_dir=")]]


def _report(what: str, record: dict, out: Path, steps_file: Path, reference: Path) -> float:
    diff = max_difference(out / "checkpoints" / "last.ckpt", reference)
    lost = steps_done(steps_file) - STEPS
    print(f"\n[slurm] {what}: state {record.get('JobState')}, restarts {record.get('Restarts')}, exit "
          f"{record.get('ExitCode')}; steps lost (redone) {lost}; max |resumed - uninterrupted| = {diff:.3e}")
    return diff


def test_the_time_limit_signal_checkpoints_requeues_and_resumes_exactly(cluster, plugin_dir, tmp_path, reference):
    """``--signal=USR1@T`` before a one-minute limit: checkpoint, status, exit 75, ``scontrol requeue`` last;
    the requeued job (the same job id, Restarts >= 1) resumes and finishes with the uninterrupted result.
    SLURM sends the signal up to ~30 s early here (its check runs periodically), so training lasts longer
    than that: every attempt of the job is signalled, requeues itself and continues."""
    out, steps_file, log = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "job.out"
    job_id = sbatch(TRAIN, _train_args(plugin_dir, out, steps_file, delay=0.6), "--time=1", "--signal=USR1@45",
                    log=log)
    wait_for(lambda: int(job(job_id).get("Restarts", 0) or 0) >= 1, timeout=300, what="the job requeued by the run")
    # the requeued job gets the same short limit and would be signalled again within its first seconds:
    # give it time to finish (the scenario is the first stop, not how many a run can take)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
    record = wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) >= 1, (record, log.read_text()[-3000:])
    text = log.read_text()
    assert "preempted by SIGUSR1" in text and "requeueing SLURM job" in text and "resume with:" in text
    assert status(out)["status"] == "finished" and not (out / ".lock").exists()
    assert _report("time limit (USR1@45, --time=1)", record, out, steps_file, reference) == 0.0


@pytest.mark.parametrize("how", ["scancel", "scancel --signal=TERM", "scontrol requeue"])
def test_cancel_and_requeue_checkpoint_and_resume_exactly(cluster, plugin_dir, tmp_path, reference, how):
    out, steps_file, log = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "job.out"
    args = _train_args(plugin_dir, out, steps_file)
    job_id = sbatch(TRAIN, args, log=log)
    wait_for(lambda: steps_done(steps_file) >= 12, timeout=180, what="training steps in the job")
    command = {"scancel": ["scancel", job_id], "scancel --signal=TERM": ["scancel", "--signal=TERM", job_id],
               "scontrol requeue": ["scontrol", "requeue", job_id]}[how]
    subprocess.run(command, check=True)
    if how == "scontrol requeue":  # SLURM stops it (SIGTERM) and starts it again, with the same script
        record = wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
        assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) == 1, (record, log.read_text()[-3000:])
    else:
        record = wait_job(job_id, ("CANCELLED", "FAILED", "COMPLETED"), timeout=120)
        assert record["JobState"] in ("CANCELLED", "FAILED"), record
        if how == "scancel --signal=TERM":  # only the step was signalled: the job ends with the run's code
            assert record["ExitCode"].startswith("75"), record
        wait_for(lambda: status(out)["status"] == "interrupted", timeout=30, what="status.json")
        assert status(out)["exit_code"] == 75 and not (out / ".lock").exists()
        saved = checkpoint_step(out / "checkpoints" / "last.ckpt")
        assert 0 < saved < STEPS
        again = sbatch(TRAIN, args, log=log)  # the user resubmits the same script
        record = wait_job(again, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
        assert record["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert status(out)["status"] == "finished"
    assert _report(how, record, out, steps_file, reference) == 0.0


def test_two_jobs_on_one_output_dir_one_runs_the_other_exits_73(cluster, plugin_dir, tmp_path):
    out, steps_file = tmp_path / "run", tmp_path / "steps.txt"
    args = _train_args(plugin_dir, out, steps_file, delay=0.5)  # (30 s: still training when the second starts)
    first = sbatch(TRAIN, args, log=tmp_path / "first.out")
    wait_for(lambda: steps_done(steps_file) >= 3, timeout=180, what="the first job training")
    second = sbatch(TRAIN, args, log=tmp_path / "second.out")
    record = wait_job(second, ("FAILED", "COMPLETED", "CANCELLED"), timeout=180)
    assert record["JobState"] == "FAILED" and record["ExitCode"].startswith("73"), record
    assert "is in use by" in (tmp_path / "second.out").read_text()
    done = wait_job(first, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    assert done["JobState"] == "COMPLETED"
    print(f"\n[slurm] two jobs, one folder: the second {record['JobState']} with exit {record['ExitCode']}, "
          f"the first {done['JobState']}")


def test_a_job_array_sweep_survives_a_cancelled_task_and_a_partial_resubmit(cluster, plugin_dir, tmp_path,
                                                                             tmp_path_factory):
    """Two workers share three runs through the locks; one worker is cancelled in the middle of its
    run; resubmitting only its index finishes the sweep: the finished runs are skipped, the cut one
    resumes exactly, the summary lists all three as finished."""
    spec = tmp_path / "coeff.yaml"
    common = run_args(plugin_dir, Path("unused"), "checkpoint.every_n_steps=5", steps=STEPS, delay=DELAY)
    fixed = [a for a in common if not a.startswith(("output_dir=", "logger="))]  # (the sweep sets the logger's group)
    spec.write_text(json.dumps({"name": "coeff", "method": "grid",
                                "parameters": {"model.coeff": {"values": [0.5, 0.7, 0.9]}},
                                "command": ["${env}", "${interpreter}", "-m", "iresflow", "train", *fixed,
                                            "${args_no_hyphens}"]}))
    sweep_dir = tmp_path / "sweep"
    log = tmp_path / "array_%a.out"
    array = sbatch(SWEEP, [str(spec), str(sweep_dir)], "--array=0-1", log=log)
    first_run = {}

    def a_run_is_training() -> bool:
        for folder in sweep_dir.glob("*/"):
            if (folder / "checkpoints" / "last.ckpt").is_file() and (folder / ".lock").is_file():
                first_run["folder"] = folder
                return True
        return False

    wait_for(a_run_is_training, timeout=420, what="a sweep run with a checkpoint")
    task = f"{array}_1"
    subprocess.run(["scancel", task], check=True)
    wait_job(task, ("CANCELLED", "FAILED", "COMPLETED"), timeout=120)
    wait_job(f"{array}_0", ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    statuses = {f.name: json.loads((f / "status.json").read_text())["status"] for f in sweep_dir.glob("*/")
                if (f / "status.json").is_file()}
    assert "interrupted" in statuses.values() or len(statuses) < 3 or set(statuses.values()) == {"finished"}
    again = sbatch(SWEEP, [str(spec), str(sweep_dir)], "--array=1", log=log)  # a partial resubmit
    record = wait_job(f"{again}_1", ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    assert record["JobState"] == "COMPLETED", (tmp_path / "array_1.out").read_text()[-3000:]
    finals = {f.name: json.loads((f / "status.json").read_text())["status"] for f in sweep_dir.glob("*/")
              if (f / "status.json").is_file()}
    assert len(finals) == 3 and set(finals.values()) == {"finished"}, finals
    summary = (sweep_dir / "summary.md").read_text()
    assert "runs: 3 (3 finished, 0 failed)" in summary
    # every run ends exactly where an uninterrupted run of its settings ends
    for folder in (f for f in sweep_dir.glob("*/") if (f / "config.yaml").is_file()):
        coeff = yaml.safe_load((folder / "config.yaml").read_text())["model"]["coeff"]
        ref = _reference(plugin_dir, tmp_path_factory, f"model.coeff={coeff}")
        assert max_difference(folder / "checkpoints" / "last.ckpt", ref) == 0.0, folder.name
    print(f"\n[slurm] job array: task 1 cancelled while {first_run.get('folder', Path('?')).name} trained; statuses "
          f"after the cancel {statuses}; after resubmitting --array=1: {finals}; all equal to uninterrupted runs")
