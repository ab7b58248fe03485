"""Shared by the fault tests: a tiny real run, started as a real ``iresflow train`` process.

The model is the toy ``iresnet_flow`` itself (2 blocks of a 2-8-2 MLP, the Russian-roulette
log-det with Hutchinson probes, so resuming must bring the random generators back), made
a little slower per training step (``delay``) so that a signal lands in the middle of
training, counting its training steps in a file (``steps_file``: what a killed process had
done), and, when asked, diverging (``nan_from``), failing its evaluation (``nan_in_eval``) or taking
``build_delay`` seconds to build (after creating ``build_file``), or ``val_delay`` seconds per
evaluation batch (counted in ``val_file``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

SLOW_FLOW_PLUGIN = textwrap.dedent('''
    import time

    from iresflow.models import ResidualFlow
    from iresflow.registry import register


    @register("model", "test_slow_flow", description="test: the iresnet_flow, with a pause per training step")
    class SlowFlow(ResidualFlow):
        """``nan_from``: training losses are NaN from that step on; ``nan_in_eval``: evaluation's are."""

        def __init__(self, in_shape=(2,), delay=0.0, steps_file=None, nan_from=None, nan_in_eval=False,
                     num_classes=None, build_file=None, build_delay=0.0, val_file=None, val_delay=0.0,
                     **params):
            if build_file:  # a slow build, announced: a signal can land while the run is being built
                open(build_file, "w").close()
                time.sleep(build_delay)
            super().__init__(in_shape=in_shape, **params)
            self.delay, self.steps_file = float(delay), steps_file
            self.val_file, self.val_delay = val_file, float(val_delay)
            self.nan_from, self.nan_in_eval, self.steps = nan_from, nan_in_eval, 0

        def log_prob(self, x):
            logp = super().log_prob(x)
            if self.training:
                time.sleep(self.delay)
                self.steps += 1
                if self.steps_file:
                    with open(self.steps_file, "a") as f:
                        f.write(".")
                if self.nan_from is not None and self.steps > self.nan_from:
                    return logp * float("nan")
            else:
                time.sleep(self.val_delay)
                if self.val_file:
                    with open(self.val_file, "a") as f:
                        f.write(".")
                if self.nan_in_eval:
                    return logp * float("nan")
            return logp
''')


def write_plugin(tmp_path_factory) -> Path:
    """The plugin folder, one per test session (a plugin file is imported once per process: the
    same name registered from two files would be a duplicate)."""
    folder = tmp_path_factory.getbasetemp() / "plugins-slow-flow"
    if not (folder / "slow_flow.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "slow_flow.py").write_text(SLOW_FLOW_PLUGIN)
    return folder


def run_args(plugin_dir: Path, out: Path, *extra: str, steps: int = 30, delay: float = 0.0,
             steps_file: Path | None = None) -> list[str]:
    """A run of ``steps`` steps, 20 batches of 25 points an epoch, validation every epoch."""
    args = [f"plugins=[{plugin_dir}]", "model.name=test_slow_flow", f"+model.delay={delay}",
            "model.n_blocks=2", "model.hidden=[8]", "model.estimator.n_terms=1", f"output_dir={out}",
            "data.batch_size=25", "data.train_size=500", "data.val_size=50", "data.test_size=50",
            "task.n_samples=50", f"trainer.max_steps={steps}", "trainer.check_val_every_n_epoch=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none"]
    if steps_file is not None:
        args.append(f"+model.steps_file={steps_file}")
    return [*args, *extra]


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    for var in ("IRESFLOW_RUN_DIR", "IRESFLOW_RESUME", "IRESFLOW_DEBUG"):
        e.pop(var, None)
    return e


def start(args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``iresflow train ARGS`` as its own process, output to ``log``."""
    return subprocess.Popen([sys.executable, "-m", "iresflow", "train", *args], cwd=ROOT,
                            env={**env(), **(extra_env or {})}, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def run(args: list[str], timeout: float = 300, extra_env: dict[str, str] | None = None,
        command: str = "train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iresflow", command, *args], cwd=ROOT,
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def steps_done(steps_file: Path) -> int:
    return len(steps_file.read_text()) if steps_file.is_file() else 0


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the parameters and buffers of two checkpoints."""
    sa = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())
