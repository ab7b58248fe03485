"""Benchmark 8 -- cost of the periodic checkpoint at its default interval.

A real ``iresflow train`` setup (config, components, the run layer's callbacks and its
atomic checkpoint writer) is trained for a few steps with the periodic checkpoint at its
default interval (``checkpoint.every_minutes`` in ``configs/train.yaml``). Measured:

- ``step``: the median training step (``on_train_batch_start`` to ``on_train_batch_end``);
- ``check``: what the periodic checkpoint callback adds to every step when no checkpoint is
  due (its ``on_train_batch_end``: a clock read and a decision);
- ``save``: one checkpoint of the trained state (model, optimiser, loops, callbacks, random
  states), written atomically (temporary file, fsync, rename), median of a few.

Share of the step time = ``check / step + save / interval``: the per-step decision plus one
save per interval, spread over the steps of the interval. Target: < 2%. On a CPU the
paper-sized CIFAR-10 flow (15.7 M parameters) is too slow to train here; its checkpoint
(weights and Adam's moments) is written and timed alone: ``save / interval``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Context, median, target

TITLE = "Cost of the periodic checkpoint at its default interval"


def _cases(ctx: Context) -> dict[str, list[str]]:
    """Config overrides per case: the default toy run, and a multi-scale image flow."""
    steps = 6 if ctx.quick else 40
    common = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
              f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
              f"trainer.accelerator={'gpu' if ctx.cuda else 'cpu'}"]
    toy = ["data.train_size=100000"] + (["model.n_blocks=2", "data.batch_size=64"] if ctx.quick else [])
    if ctx.cuda and not ctx.quick:  # the CIFAR-10 density model of the paper's settings
        image = ["experiment=cifar10_density", "data=fake", "data.image_size=[3,32,32]", "data.size=1024",
                 "trainer.max_epochs=-1"]
    else:  # the CPU size of the image benchmark: 4 blocks of 32 channels a scale, 1x28x28, batch 32
        image = ["data=fake", "model=flow_multiscale", "model.n_scales=2", "model.hidden=32",
                 f"model.n_blocks={1 if ctx.quick else 4}", "data.image_size=[1,28,28]", "data.batch_size=32",
                 f"data.size={64 if ctx.quick else 1024}"]
    return {"toy": common + toy, "image": common + image}


class _StepTimes:
    """Seconds from each training batch's start to its end (the whole step, callbacks included)."""

    def __init__(self, device):
        self.device, self.times, self._t0 = device, [], 0.0

    def on_train_batch_start(self, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self._t0)


def _timed_hook(callback, name: str, times: list[float]) -> None:
    """Wrap ``callback.<name>`` so that every call is timed (Lightning calls it through getattr)."""
    original = getattr(callback, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    setattr(callback, name, timed)


def _measure(ctx: Context, overrides: list[str], folder: Path) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback

    from iresflow.config import load_config
    from iresflow.run.build import build_components, trainer_kwargs
    from iresflow.run.checkpointing import AtomicCheckpointIO, RandomStates, periodic_checkpoint

    cfg = load_config([*overrides, f"output_dir={folder}"])
    minutes = float(cfg.checkpoint.every_minutes)
    pl.seed_everything(ctx.seed, verbose=False)
    dm, model, task = build_components(cfg, check_data="fit")
    periodic = periodic_checkpoint(folder / "checkpoints", minutes, None)
    check_times: list[float] = []
    _timed_hook(periodic, "on_train_batch_end", check_times)
    steps = _StepTimes(ctx.device)
    timer = type("StepTimer", (Callback,), {"on_train_batch_start": steps.on_train_batch_start,
                                            "on_train_batch_end": steps.on_train_batch_end})()
    trainer = pl.Trainer(**trainer_kwargs(cfg), logger=False, callbacks=[timer, RandomStates(), periodic],
                         plugins=[AtomicCheckpointIO()], default_root_dir=str(folder))
    trainer.fit(task, datamodule=dm)
    saves = []
    for _ in range(2 if ctx.quick else 5):
        t0 = time.perf_counter()
        trainer.save_checkpoint(str(folder / "checkpoints" / "last.ckpt"), weights_only=False)
        saves.append(time.perf_counter() - t0)
    size = (folder / "checkpoints" / "last.ckpt").stat().st_size
    warm = steps.times[2:] or steps.times  # the first steps initialise (ActNorm, optimiser state)
    step_s, check_s, save_s = median(warm), median(check_times[2:] or check_times), median(saves)
    interval_s = minutes * 60
    share = check_s / step_s + save_s / interval_s
    ctx.log(f"checkpoint: step {step_s*1e3:.1f} ms, check {check_s*1e6:.1f} us, save {save_s*1e3:.1f} ms "
            f"({size/2**20:.1f} MiB) every {minutes:g} min -> {share*100:.3f}% of the step time")
    return {"interval_minutes": minutes, "step_s": step_s, "check_s": check_s, "save_s": save_s,
            "saves_s": saves, "checkpoint_bytes": size, "steps_per_interval": interval_s / step_s,
            "parameters": sum(p.numel() for p in task.parameters()), "share": share,
            "overrides": overrides}


def _measure_save_only(ctx: Context, overrides: list[str], folder: Path, check_s: float) -> dict:
    """A model too big to train here: the write of its weights and Adam's state (what dominates a
    checkpoint), with the per-step decision measured on the toy run."""
    from iresflow.config import load_config
    from iresflow.run.build import build_components
    from iresflow.run.checkpointing import AtomicCheckpointIO

    cfg = load_config([*overrides, f"output_dir={folder}"])
    _, _, task = build_components(cfg)
    opt = task.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    for p in task.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam's moments exist after the first step: the checkpoint's real size
    state = {"state_dict": task.state_dict(), "optimizer_states": [opt.state_dict()]}
    io, path, saves = AtomicCheckpointIO(), folder / "last.ckpt", []
    for _ in range(3):
        t0 = time.perf_counter()
        io.save_checkpoint(state, path)
        saves.append(time.perf_counter() - t0)
    minutes = float(cfg.checkpoint.every_minutes)
    save_s, size = median(saves), path.stat().st_size
    ctx.log(f"checkpoint: {sum(p.numel() for p in task.parameters())/1e6:.1f} M parameters, save {save_s:.2f} s "
            f"({size/2**20:.0f} MiB) every {minutes:g} min -> {save_s / (minutes * 60) * 100:.3f}% of the time")
    return {"interval_minutes": minutes, "step_s": None, "check_s": check_s, "save_s": save_s, "saves_s": saves,
            "checkpoint_bytes": size, "parameters": sum(p.numel() for p in task.parameters()),
            "share": save_s / (minutes * 60), "overrides": overrides, "note": "save only; no training step"}


def run(ctx: Context) -> dict:
    res: dict = {"settings": {}, "cases": {}}
    for case, overrides in _cases(ctx).items():
        with tempfile.TemporaryDirectory(prefix="iresflow-ckpt-bench-") as tmp:
            res["cases"][case] = _measure(ctx, overrides, Path(tmp) / "run")
        res["settings"][case] = overrides
    if not ctx.quick and not ctx.cuda:  # the paper-sized CIFAR-10 flow: its checkpoint, not its (CPU) steps
        overrides = ["experiment=cifar10_density", "data=fake", "logger=none"]
        with tempfile.TemporaryDirectory(prefix="iresflow-ckpt-bench-") as tmp:
            res["cases"]["cifar10_density"] = _measure_save_only(ctx, overrides, Path(tmp),
                                                                 res["cases"]["toy"]["check_s"])
        res["settings"]["cifar10_density"] = overrides
    res["targets"] = [target(f"periodic checkpoint share of the {case} step", c["share"], "<", 0.02,
                             unit="fraction", description=f"default interval {c['interval_minutes']:g} min")
                      for case, c in res["cases"].items()]
    res["table"] = [{"metric": f"{case}: step ms / check us / save ms ({c['checkpoint_bytes']/2**20:.1f} MiB)",
                     "iresflow": (f"{c['step_s']*1e3:.1f}" if c["step_s"] else "-")
                     + f" / {c['check_s']*1e6:.1f} / {c['save_s']*1e3:.1f}",
                     "ratio": c["share"], "ratio_meaning": "share of the step time"}
                    for case, c in res["cases"].items()]
    return res
