"""Evaluation never changes training.

Validation, test and the pictures neither read nor write the training's power-iteration
vectors or random streams, so

- how often a run validates does not change its training: runs that differ only in
  ``trainer.check_val_every_n_epoch`` end with equal parameters *and* buffers;
- a run killed (SIGKILL: nothing runs on the way out) right after a periodic checkpoint
  written on the last batch of an epoch that validates, and resumed with ``ckpt_path=auto``
  (which does not repeat that validation), ends equal to the uninterrupted run;
- a validation that converges the vectors of its own copy leaves the training's ``u``, ``v``
  and ``sigma`` bit for bit as they were.

The reference is always a run that never validated (or never stopped), never the code itself.
"""

from __future__ import annotations

import signal

import pytest
import torch

from iresflow.config import load_config
from iresflow.run import train
from run_helpers import checkpoint_step, max_difference, run, run_args, start, status, steps_done, wait_for

STEPS = 60          # 3 epochs of 20 batches


def _lipschitz_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in module.named_buffers()
            if name.rsplit(".", 1)[-1] in ("u", "v", "sigma")}


@pytest.mark.slow  # three short in-process runs: ~15 s
@pytest.mark.parametrize("extra", [(), ("task.ema_decay=0.9",)], ids=["plain", "ema"])
def test_how_often_a_run_validates_does_not_change_its_training(plugin_dir, tmp_path, extra):
    ends = {}
    for every in (1, 2, 1000):  # every epoch, every other one, never
        out = tmp_path / f"val{every}"
        train(load_config(run_args(plugin_dir, out, f"trainer.check_val_every_n_epoch={every}",
                                   "task.lipschitz_eval_iterations=25", *extra, steps=STEPS)))
        ends[every] = out / "checkpoints" / "last.ckpt"
    for every in (1, 2):
        diff = max_difference(ends[every], ends[1000])
        print(f"\n[eval isolation] validating every {every} epoch(s) vs never: max |difference| = {diff:.3e}")
        assert diff == 0.0


def test_a_validation_leaves_the_training_vectors_bit_for_bit(plugin_dir, tmp_path):
    """The hooks themselves: after a validation the training's vectors are those it had before, while
    the validation ran with vectors converged to the weights (its own copy)."""
    from iresflow.run.build import build_components

    cfg = load_config(run_args(plugin_dir, tmp_path / "run", "task.lipschitz_eval_iterations=50", steps=1))
    _, _, task = build_components(cfg)
    with torch.no_grad():  # move the weights so that the stored vectors are stale
        for p in task.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before = _lipschitz_buffers(task)
    seen: dict[str, torch.Tensor] = {}
    task.on_validation_start()
    seen.update(_lipschitz_buffers(task))
    task.on_validation_end()
    after = _lipschitz_buffers(task)
    assert before.keys() == after.keys() and before
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # during the validation the vectors had been iterated (a validation with stale vectors would
    # apply maps above c); the reference: the exact largest singular value, for dense maps
    layers = {n: m for n, m in task.named_modules() if hasattr(m, "power_iteration") and m.weight.dim() == 2}
    assert layers
    for n, m in layers.items():
        exact = float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
        assert abs(float(seen[f"{n}.sigma"]) - exact) <= 1e-4 * exact, n
        assert abs(float(before[f"{n}.sigma"]) - exact) > 1e-4 * exact, n  # (stale before: the test can fail)


@pytest.mark.slow  # one killed `iresflow train` process, its resume and a reference run: ~20 s
def test_sigkill_after_an_epoch_end_checkpoint_resumes_to_the_uninterrupted_result(plugin_dir, tmp_path):
    """The periodic checkpoint falls on the last batch of an epoch that validates (step 20): it is
    written before that validation, which then runs; the kill lands after it. The resume starts
    after the checkpoint and does not validate epoch 1 again, so the uninterrupted run's
    validation must not have changed its training."""
    reference = tmp_path / "reference"
    common = ("checkpoint.every_n_steps=20", "task.lipschitz_eval_iterations=25")
    train(load_config(run_args(plugin_dir, reference, *common, steps=STEPS)))

    out, steps_file, val_file = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "val.txt"
    args = run_args(plugin_dir, out, *common, f"+model.val_file={val_file}", steps=STEPS, delay=0.08,
                    steps_file=steps_file)
    proc = start(args, tmp_path / "first.log")
    last = out / "checkpoints" / "last.ckpt"
    # the validation after step 20 has run, and training goes on (the checkpoint is of step 20)
    wait_for(lambda: steps_done(steps_file) >= 24 and steps_done(val_file) >= 1 or proc.poll() is not None,
             what="the first validation")
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert checkpoint_step(last) == 20 and status(out)["status"] == "running"
    done = steps_done(steps_file)
    resumed = run([*args, "ckpt_path=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    diff = max_difference(last, reference / "checkpoints" / "last.ckpt")
    print(f"\n[eval isolation] SIGKILL at step {done} after the epoch-end checkpoint of step 20: "
          f"max |resumed - uninterrupted| = {diff:.3e}")
    assert diff == 0.0
