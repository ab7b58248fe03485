"""Faults of ``iresflow sweep``, injected into real processes: the sweep is SIGTERMed, SIGINTed,
SIGHUPed or SIGKILLed while its runs train, a run is preempted on its own or ignores SIGTERM,
a run folder is owned by another live process; then the same command runs again.

The runs are a stand-in training program (``STANDIN``, a real process with real signal
handlers) that keeps the contract of ``iresflow train``: ``key=value`` arguments,
``ckpt_path=auto`` resumes ``checkpoints/last.ckpt``, ``overwrite=true`` starts over,
``status.json`` and ``metrics.json``, a ``.lock`` (exit 73 while a live process owns the
folder), a checkpoint then exit 75 on SIGTERM / SIGUSR1 and 130 on SIGINT. The tests
parametrised over ``PROGRAMS`` also run against the real ``iresflow train`` as soon as its
``--help`` mentions ``ckpt_path=auto`` (skipped until then).
"""

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from iresflow.sweep import apply_overrides, load_spec, main

REPO = Path(__file__).resolve().parent.parent
LINUX = sys.platform.startswith("linux")

STANDIN = textwrap.dedent('''
    import json, os, signal, socket, subprocess, sys, time
    from datetime import datetime
    from pathlib import Path

    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out = Path(args["output_dir"])
    steps, step_time = int(args.get("steps", 4)), float(args.get("step_time", 0.01))
    ckpt = out / "checkpoints" / "last.ckpt"
    stop = []
    for sig, code in ((signal.SIGTERM, 75), (signal.SIGUSR1, 75), (signal.SIGINT, 130)):
        signal.signal(sig, lambda signum, frame, code=code: stop.append(code))
    if args.get("ignore_term") == "True":  # a program that hangs instead of stopping
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        stat = Path(f"/proc/{pid}/stat")
        return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

    def write(path, data):  # atomically, like the real run folder's files
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    try:
        owner = int(lock.read_text())
    except (OSError, ValueError):
        owner = 0
    if owner and owner != os.getpid() and alive(owner):
        print(f"error: {out} is owned by the live process {owner}", file=sys.stderr)
        sys.exit(73)
    lock.write_text(str(os.getpid()))
    previous = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else {}
    attempt = previous.get("attempt", 0) + 1

    def status(state, code=None, message=""):
        write(out / "status.json", {"status": state, "exit_code": code, "message": message, "attempt": attempt,
                                    "host": socket.gethostname(), "pid": os.getpid(),
                                    "updated": datetime.now().isoformat(timespec="seconds")})

    def end(state, code, message=""):
        status(state, code, message)
        lock.unlink()
        sys.exit(code)

    if args.get("overwrite") == "True":  # asked to start over: the old results go
        for old in (ckpt, out / "metrics.json"):
            old.unlink(missing_ok=True)
    start = json.loads(ckpt.read_text())["step"] if args.get("ckpt_path") == "auto" and ckpt.is_file() else 0
    status("running")
    with open(out / "history.txt", "a") as f:
        f.write(f"{attempt} {start}\\n")
    worker = None
    if args.get("worker") == "True":  # a helper in the run's process group, like a data-loader worker
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        (out / "worker.pid").write_text(str(worker.pid))
    print(f"attempt {attempt} from step {start} of {steps}", flush=True)
    for step in range(start, steps):
        if stop:  # the checkpoint is current (written after every step); the worker is left behind
            end("interrupted", stop[0], "stopped by a signal; resume with ckpt_path=auto")
        time.sleep(step_time)
        write(ckpt, {"step": step + 1})
        print(f"training step {step + 1}", flush=True)
    if worker is not None:
        worker.kill()
        worker.wait()
    x = float(args.get("x", 0))
    write(out / "metrics.json", {"score": (x - 0.3) ** 2, "steps": steps})
    end("finished", 0)
''')


@functools.lru_cache(maxsize=None)
def train_knows_ckpt_auto() -> bool:
    """Whether this checkout's ``iresflow train`` documents ``ckpt_path=auto`` (the run layer's contract)."""
    done = subprocess.run([sys.executable, "-m", "iresflow", "train", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    return "ckpt_path=auto" in done.stdout


needs_train_with_ckpt_auto = pytest.mark.skipif(
    not train_knows_ckpt_auto(), reason="iresflow train does not yet resume with ckpt_path=auto (the sweep passes it)")

PROGRAMS = ["standin", pytest.param("train", marks=[pytest.mark.slow, needs_train_with_ckpt_auto])]


# --------------------------------------------------------------------------- helpers

def alive(pid: int) -> bool:
    """``pid`` runs and is not a zombie (an orphan's zombie may wait long for its reaper)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    """Some live process has process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def wait_until(condition, what: str, timeout: float = 60.0) -> float:
    """Poll ``condition`` until true; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Sweep:
    """A sweep spec over one kind of program, and ways to look into its folder."""

    def __init__(self, kind: str, tmp_path: Path, values, **fixed):
        self.kind, self.out = kind, tmp_path / "sweep"
        if kind == "standin":
            program = tmp_path / "standin_train.py"
            program.write_text(STANDIN)
            params = {"x": {"values": values}, "steps": {"value": 40}, "step_time": {"value": 0.03}}
            params.update({k: {"value": v} for k, v in fixed.items()})
            spec = {"name": "faults", "method": "grid", "metric": {"name": "score", "goal": "minimize"},
                    "program": str(program), "parameters": params,
                    "command": ["${interpreter}", "${program}", "${args_no_hyphens}"]}
        else:  # a tiny toy density run through the real command
            spec = apply_overrides(load_spec(REPO / "sweeps" / "coeff_density.yaml"), [
                "logger=none", "trainer.max_steps=300", "trainer.check_val_every_n_epoch=1", "data.train_size=2000",
                "data.val_size=200", "data.test_size=200", "model.n_blocks=2", "task.n_samples=100",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
            spec["parameters"]["model.coeff"] = {"values": [0.5 + 0.1 * i for i in range(len(values))]}
        self.spec = tmp_path / "faults.yaml"
        self.spec.write_text(yaml.safe_dump(spec, sort_keys=False))
        self.args = [str(self.spec), "--out", str(self.out)]

    def start(self, *options: str, command: tuple[str, ...] = ("iresflow.sweep",)) -> subprocess.Popen:
        """The sweep as its own process (it can be killed): ``python -m iresflow.sweep``, or with
        ``command=("iresflow", "sweep")`` the ``iresflow sweep`` command (which imports more)."""
        return subprocess.Popen([sys.executable, "-m", *command, *self.args, *options], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run_dirs(self) -> list[Path]:
        return sorted(p for p in self.out.glob("*") if p.is_dir() and p.name != "logs")

    def training(self, n: int) -> bool:
        """``n`` runs are in their training loop (the stand-in: a step done; the real one: running a while)."""
        running = [d for d in self.run_dirs() if read_json(d / "status.json").get("status") == "running"]
        if self.kind == "standin":
            running = [d for d in running if (d / "checkpoints" / "last.ckpt").is_file()]
        return len(running) >= n

    def wait_training(self, n: int = 1) -> None:
        wait_until(lambda: self.training(n), f"{n} run(s) training")
        if self.kind != "standin":
            time.sleep(3.0)  # past the start-up, into the steps

    def record(self, run_dir: Path) -> dict:
        return read_json(self.out / "logs" / f"{run_dir.name}.json")

    def log(self, run_dir: Path) -> str:
        return (self.out / "logs" / f"{run_dir.name}.log").read_text()

    def summary(self) -> dict[str, str]:
        with open(self.out / "summary.csv") as f:
            return {r["run_id"]: r["status"] for r in csv.DictReader(f)}


def history(run_dir: Path) -> list[tuple[int, int]]:
    """The stand-in's starts: (attempt, step it started from)."""
    return [tuple(map(int, ln.split())) for ln in (run_dir / "history.txt").read_text().splitlines()]


# --------------------------------------------------------------------------- the sweep is stopped

@pytest.mark.skipif(not LINUX, reason="process groups are read from /proc")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130), (signal.SIGHUP, 75)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_stopping_the_sweep_stops_every_run_and_its_group(tmp_path, sig, code):
    """Two runs train (each with a worker process in its group); the sweep is signalled: both
    runs checkpoint and exit (SIGHUP is forwarded as SIGTERM), the workers they leave behind
    are ended with their group, the runs are `interrupted`, and the sweep exits 130 / 75.
    After SIGTERM the same command resumes both from their checkpoints, logs appended."""
    sweep = Sweep("standin", tmp_path, [0.1, 0.2], worker=True)
    proc = sweep.start("--parallel", "2")
    sweep.wait_training(2)
    leaders = [read_json(d / "status.json")["pid"] for d in sweep.run_dirs()]
    workers = [int((d / "worker.pid").read_text()) for d in sweep.run_dirs()]
    assert all(alive(p) for p in leaders + workers)
    t0 = time.monotonic()
    proc.send_signal(sig)
    gone = wait_until(lambda: not any(alive(p) or group_alive(p) for p in leaders + workers), "the runs to end", 30)
    out, err = proc.communicate(timeout=60)
    print(f"{signal.Signals(sig).name}: runs and workers gone {gone:.2f} s after the signal; sweep exited "
          f"{time.monotonic() - t0:.2f} s after it")
    assert proc.returncode == code, err
    assert "run the same command again" in err
    for d in sweep.run_dirs():
        said = read_json(d / "status.json")
        assert (said["status"], said["exit_code"]) == ("interrupted", 75 if code == 75 else 130)
        attempts = sweep.record(d)["attempts"]
        assert [(a["status"], a["exit_code"]) for a in attempts] == [("interrupted", said["exit_code"])]
    assert set(sweep.summary().values()) == {"interrupted"}
    md = (sweep.out / "summary.md").read_text()
    assert "## Interrupted runs" in md and f"interrupted (exit {said['exit_code']})" in md
    assert "## Failed runs" not in md
    if sig != signal.SIGTERM:
        return

    stopped_at = {d: read_json(d / "checkpoints" / "last.ckpt")["step"] for d in sweep.run_dirs()}
    assert all(0 < s < 40 for s in stopped_at.values())
    assert main(sweep.args + ["--parallel", "2"]) == 0
    assert set(sweep.summary().values()) == {"finished"}
    for d in sweep.run_dirs():
        assert history(d) == [(1, 0), (2, stopped_at[d])]  # resumed where it stopped, not from 0
        log = sweep.log(d)
        first, second = log.index("===== attempt 1 "), log.index("===== attempt 2 ")
        assert first < log.index("training step 1\n") < second < log.index("training step 40\n")
        assert log.count("$ ") == 2 and "ckpt_path=auto" in log[second:]
        attempts = sweep.record(d)["attempts"]
        assert [(a["status"], a["exit_code"]) for a in attempts] == [("interrupted", 75), ("finished", 0)]
        assert all(a["wall_time"] > 0 for a in attempts)


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("kind", PROGRAMS)
def test_killing_the_sweep_stops_its_run_and_the_rerun_resumes(tmp_path, kind, kill):
    """`iresflow sweep` is killed while its run trains. SIGTERM: the sweep forwards it and records
    the run as interrupted. SIGKILL leaves the sweep no say: the run gets SIGTERM from the kernel
    as the sweep dies, checkpoints and exits as if preempted, and the rerun settles the lost
    attempt from the run's status.json. Either way no process of the run survives, and the rerun
    resumes the run; its log holds both attempts."""
    sweep = Sweep(kind, tmp_path, [0.1])
    proc = sweep.start(command=("iresflow", "sweep"))
    sweep.wait_training()
    (run_dir,) = sweep.run_dirs()
    leader = read_json(run_dir / "status.json")["pid"]
    proc.send_signal(kill)
    gone = wait_until(lambda: not alive(leader) and not group_alive(leader), "the run to end", 60)
    proc.communicate(timeout=60)
    print(f"{kind}, {signal.Signals(kill).name} of the sweep: its run was gone {gone:.2f} s later")
    assert proc.returncode == (75 if kill == signal.SIGTERM else -signal.SIGKILL)
    said = read_json(run_dir / "status.json")
    assert (said["status"], said["exit_code"]) == ("interrupted", 75)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # with SIGKILL the sweep could not record the end
    assert sweep.record(run_dir)["attempts"][-1]["status"] == ("interrupted" if kill == signal.SIGTERM else "running")

    assert main(sweep.args) == 0
    attempts = sweep.record(run_dir)["attempts"]
    assert [(a["status"], a["exit_code"]) for a in attempts] == [("interrupted", 75), ("finished", 0)]
    assert attempts[0]["wall_time"] is not None  # with SIGKILL: from the run's status.json
    log = sweep.log(run_dir)
    assert log.index("===== attempt 1 ") < log.index("===== attempt 2 ")
    if kind == "standin":
        assert history(run_dir)[1][1] > 0  # resumed from its checkpoint


@pytest.mark.skipif(not LINUX, reason="process groups are read from /proc")
def test_a_run_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    sweep = Sweep("standin", tmp_path, [0.1], ignore_term=True, steps=100000)
    proc = sweep.start("--grace", "1")
    sweep.wait_training()
    (run_dir,) = sweep.run_dirs()
    leader = read_json(run_dir / "status.json")["pid"]
    proc.send_signal(signal.SIGTERM)
    gone = wait_until(lambda: not alive(leader) and not group_alive(leader), "the run to be killed", 30)
    assert gone >= 0.9  # not before the grace
    proc.communicate(timeout=30)
    assert proc.returncode == 75
    (attempt,) = sweep.record(run_dir)["attempts"]
    assert (attempt["status"], attempt["exit_code"]) == ("interrupted", -signal.SIGKILL)
    assert read_json(run_dir / "status.json")["status"] == "running"  # killed before it could say
    assert sweep.summary() == {run_dir.name: "interrupted"}  # its owner is dead: not running


# --------------------------------------------------------------------------- a run is stopped

def test_a_run_past_its_timeout_is_stopped_failed_and_resumed_next_time(tmp_path):
    sweep = Sweep("standin", tmp_path, [0.1], steps=100000, step_time=0.01)
    assert main(sweep.args + ["--timeout", "0.5"]) == 1
    (run_dir,) = sweep.run_dirs()
    (attempt,) = sweep.record(run_dir)["attempts"]
    assert (attempt["status"], attempt["exit_code"]) == ("failed", 75) and "--timeout of 0.5 s" in attempt["note"]
    assert 0.5 <= attempt["wall_time"] < 30 and sweep.summary() == {run_dir.name: "failed"}
    stopped_at = read_json(run_dir / "checkpoints" / "last.ckpt")["step"]
    assert main(sweep.args + ["--timeout", "0.5"]) == 1
    assert history(run_dir) == [(1, 0), (2, stopped_at)]  # the next invocation resumes it


@pytest.mark.skipif(not LINUX, reason="process groups are read from /proc")
def test_a_run_preempted_on_its_own_is_interrupted_not_failed(tmp_path):
    """A scheduler SIGTERMs one run (not the sweep): it is `interrupted`, the sweep goes on with
    the next run and exits 75 so that a requeue resumes it."""
    sweep = Sweep("standin", tmp_path, [0.1, 0.2])
    proc = sweep.start()
    sweep.wait_training()
    (first,) = [d for d in sweep.run_dirs() if (d / "status.json").exists()]
    os.kill(read_json(first / "status.json")["pid"], signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "1 run(s) interrupted" in err and "run the same command again" in err
    statuses = sweep.summary()
    assert statuses.pop(first.name) == "interrupted" and list(statuses.values()) == ["finished"]


def test_a_run_folder_owned_by_a_live_process_is_busy_not_failed(tmp_path, capsys):
    """Exit 73 (another live process holds the folder's lock, e.g. a second array task): the
    run is skipped as `busy`, nothing in its folder is touched; once free, it runs."""
    sweep = Sweep("standin", tmp_path, [0.1])
    assert main(sweep.args + ["--dry-run"]) == 0
    run_id = next(ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[1]"))
    run_dir = sweep.out / run_id
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_text(str(os.getpid()))  # this test process: alive
    assert main(sweep.args) == 0
    assert "another live process" in capsys.readouterr().err
    assert sweep.summary() == {run_id: "busy"}
    (attempt,) = sweep.record(run_dir)["attempts"]
    assert (attempt["status"], attempt["exit_code"]) == ("busy", 73)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    assert "busy (exit 73)" in (sweep.out / "summary.md").read_text()
    (run_dir / ".lock").unlink()
    assert main(sweep.args) == 0
    assert sweep.summary() == {run_id: "finished"}


# --------------------------------------------------------------------------- which runs run again

def test_status_json_decides_over_metrics_json(tmp_path, capsys):
    """A folder's status.json says whether its run finished; metrics.json only where there is none."""
    sweep = Sweep("standin", tmp_path, [0.1, 0.2, 0.3])
    assert main(sweep.args + ["--dry-run"]) == 0
    ids = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    dirs = [sweep.out / i for i in ids]
    for d in dirs:
        (d / "checkpoints").mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"score": 9.0}))
    (dirs[0] / "status.json").write_text(json.dumps({"status": "interrupted", "exit_code": 75, "attempt": 1}))
    (dirs[0] / "checkpoints" / "last.ckpt").write_text(json.dumps({"step": 3}))
    (dirs[1] / "status.json").write_text(json.dumps({"status": "finished", "exit_code": 0, "attempt": 1}))
    # dirs[2]: metrics.json only, a folder from a program without status.json
    assert main(sweep.args + ["--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "(interrupted, resumes its checkpoint)" in listing and listing.count("(done, skipped)") == 2
    assert main(sweep.args) == 0
    assert history(dirs[0]) == [(2, 3)] and not (dirs[1] / "history.txt").exists()
    assert not (dirs[2] / "history.txt").exists()
    assert list(sweep.summary().values()) == ["finished", "cached", "cached"]
    assert read_json(dirs[0] / "metrics.json")["score"] == pytest.approx(0.04)


def test_fresh_starts_unfinished_runs_over_in_place(tmp_path):
    """--fresh passes overwrite=true instead of ckpt_path=auto: the program starts from step 0;
    the sweep removes nothing (a file the user put in the folder stays)."""
    sweep = Sweep("standin", tmp_path, [0.1])
    proc = sweep.start()
    sweep.wait_training()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    (run_dir,) = sweep.run_dirs()
    (run_dir / "notes.txt").write_text("mine\n")
    assert read_json(run_dir / "checkpoints" / "last.ckpt")["step"] > 0
    assert main(sweep.args + ["--fresh"]) == 0
    assert history(run_dir) == [(1, 0), (2, 0)]
    assert (run_dir / "notes.txt").read_text() == "mine\n"
    assert "overwrite=True" in sweep.log(run_dir).split("===== attempt 2 ")[1]
