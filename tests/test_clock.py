"""``time/train_seconds``: the time of the training steps alone, carried across a resume.

Each training step of the test model sleeps ``delay`` seconds and each validation batch ``val_delay``:
the clock must count at least every training pause, none of the validation's, and keep counting
after a resume from the checkpoint.
"""

from __future__ import annotations

from iresflow.config import load_config
from iresflow.run import train
from run_helpers import run_args

DELAY, VAL_DELAY = 0.03, 0.25


def test_training_time_counts_training_steps_not_validation_and_survives_a_resume(plugin_dir, tmp_path):
    out = tmp_path / "run"
    extra = (f"+model.val_delay={VAL_DELAY}",)
    first = train(load_config(run_args(plugin_dir, out, *extra, steps=20, delay=DELAY))).metrics
    # 20 steps = 1 epoch of 20 batches; one validation of 2 batches (and the test's 2, after the fit)
    assert 20 * DELAY <= first["time/train_seconds"] <= first["time/fit_seconds"] - 2 * VAL_DELAY
    assert first["time/train_cpu_seconds"] > 0
    resumed = train(load_config(run_args(plugin_dir, out, *extra, "ckpt_path=auto", "resume_changes=allow",
                                         steps=40, delay=DELAY))).metrics
    assert resumed["trainer/global_step"] == 40
    assert resumed["time/train_seconds"] >= first["time/train_seconds"] + 20 * DELAY
    assert resumed["time/train_seconds"] <= first["time/train_seconds"] + resumed["time/fit_seconds"]
