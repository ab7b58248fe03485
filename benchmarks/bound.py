"""Does Lip <= c hold at every training step? sigma(W_applied) / c over a real training run.

After every optimiser step (a Lightning callback's ``on_train_batch_end``, which runs after the
task's optimiser step and its Lipschitz upkeep) every normalised linear map is materialised as
the *next training forward* would apply it -- a copy of the layer in training mode fed a zero
input, so the ``power_iteration`` upkeep's in-forward iterations run on the copy -- and its exact
operator norm is taken in float64: the matrix norm of a dense (or 1x1) weight, the largest
singular value of the materialised convolution operator at the layer's input size otherwise.
The record is the largest ``norm / c`` over the layers and the steps, and the power iterations
each step's upkeep ran.

    python -m benchmarks.bound                      # the default toy run (2000 steps), both upkeeps
    python -m benchmarks.bound --steps 200 -- model.n_blocks=4   # any config overrides after --

Prints one JSON line per upkeep; ``--out FILE`` writes them all.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["normalised_maps", "next_applied_norm", "BoundWatch", "train_and_watch"]


def normalised_maps(model: nn.Module) -> list[nn.Module]:
    """The linear maps of ``model`` whose normalisation bounds them (``coeff`` finite)."""
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and hasattr(m, "weight_for"):
            if math.isfinite(float(getattr(m, "coeff", math.inf))):
                out.append(m)
    return out


def _input_size(layer: nn.Module) -> tuple[int, int] | None:
    return getattr(layer, "input_size", None) or getattr(layer, "_watched_input_size", None)


def next_applied_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer's next training forward applies (run on a copy: the layer is untouched)."""
    probe = copy.deepcopy(layer).train()
    if isinstance(layer, nn.Linear):
        x = torch.zeros(1, layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
    else:
        size = _input_size(layer) or (1, 1)
        x = torch.zeros(1, layer.in_channels, *size, dtype=layer.weight.dtype, device=layer.weight.device)
    with torch.enable_grad():
        return probe.weight_for(x).detach()


def operator_norm(layer: nn.Module, weight: torch.Tensor) -> float:
    """Exact norm (float64) of the map ``x -> layer's linear map with weight`` at its input size."""
    w = weight.detach().double()
    if isinstance(layer, nn.Linear) or (w.shape[-2:] == (1, 1) and tuple(layer.stride) == (1, 1)
                                        and tuple(layer.padding) == (0, 0)):
        return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2))
    h, wd = _input_size(layer)
    c = layer.in_channels
    basis = torch.eye(c * h * wd, dtype=torch.float64, device=w.device).view(-1, c, h, wd)
    out = F.conv2d(basis, w, None, layer.stride, layer.padding).flatten(1)  # row i: the map applied to e_i
    return float(torch.linalg.matrix_norm(out, ord=2))


def next_applied_norm(layer: nn.Module) -> float:
    """Exact operator norm of the map the layer's next training forward applies."""
    return operator_norm(layer, next_applied_weight(layer))


def _watch_input_sizes(model: nn.Module) -> None:
    """Conv layers that do not store their input size (plugins) get it recorded at every forward."""
    for m in normalised_maps(model):
        if isinstance(m, nn.Conv2d) and getattr(m, "input_size", None) is None:
            def hook(mod, args):
                mod._watched_input_size = tuple(args[0].shape[-2:])
            m.register_forward_pre_hook(hook)


try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class BoundWatch(Callback):
    """After every optimiser step: the largest ``norm(next applied map) / c`` over the layers,
    and the iterations the upkeep ran (max over layers)."""

    def __init__(self, every: int = 1):
        self.every = int(every)
        self.ratios: list[float] = []          # per watched step: max over layers
        self.iterations: list[int] = []        # per step: max over layers of last_upkeep_iterations
        self.mean_iterations: list[float] = []
        self.worst: dict[str, Any] = {"ratio": 0.0}

    def on_fit_start(self, trainer, pl_module):
        _watch_input_sizes(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = normalised_maps(pl_module.model)
        counts = [int(getattr(m, "last_upkeep_iterations", 0)) for m in layers]
        if counts:
            self.iterations.append(max(counts))
            self.mean_iterations.append(sum(counts) / len(counts))
        step = trainer.global_step
        if step % self.every:
            return
        with torch.no_grad():
            worst = 0.0
            for m in layers:
                if isinstance(m, nn.Conv2d) and _input_size(m) is None:
                    continue
                r = next_applied_norm(m) / float(m.coeff)
                if r > worst:
                    worst = r
                if r > self.worst["ratio"]:
                    self.worst = {"ratio": r, "step": step, "layer": type(m).__name__}
            self.ratios.append(worst)

    def summary(self) -> dict[str, Any]:
        its = self.iterations
        return {"max_ratio": max(self.ratios) if self.ratios else None, "worst": self.worst,
                "steps_watched": len(self.ratios),
                "iterations_max": max(its) if its else None,
                "iterations_mean_of_max": sum(its) / len(its) if its else None,
                "iterations_mean": (sum(self.mean_iterations) / len(self.mean_iterations)
                                    if self.mean_iterations else None),
                "iterations_after_step_100": (sum(its[100:]) / len(its[100:])) if len(its) > 100 else None}


def train_and_watch(overrides: list[str], every: int = 1, threads: int = 1) -> dict[str, Any]:
    """Train the config ``overrides`` describe (no logger, checkpoints or validation: evaluation
    never changes training) with a :class:`BoundWatch`; returns its summary."""
    import lightning.pytorch as pl

    from iresflow.config import load_config
    from iresflow.run.build import build_components

    torch.set_num_threads(threads)
    cfg = load_config(overrides)
    pl.seed_everything(int(cfg.seed), verbose=False)
    dm, model, task = build_components(cfg)
    watch = BoundWatch(every)
    trainer = pl.Trainer(max_steps=int(cfg.trainer.max_steps), max_epochs=-1, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[watch])
    t0 = time.perf_counter()
    import os
    import tempfile

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:  # (the task's final pictures land in the working folder)
        os.chdir(scratch)
        try:
            trainer.fit(task, datamodule=dm)
        finally:
            os.chdir(here)
    out = watch.summary()
    out["seconds"] = time.perf_counter() - t0
    out["steps"] = int(trainer.global_step)
    out["overrides"] = overrides
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the config's)")
    p.add_argument("--every", type=int, default=1, help="measure every N steps (1: every step)")
    p.add_argument("--upkeep", default="power_iteration,converged")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    rows = []
    for upkeep in a.upkeep.split(","):
        ov = list(a.overrides) + [f"+model.normalization.upkeep={upkeep}", "logger=none"]
        if a.steps:
            ov.append(f"trainer.max_steps={a.steps}")
        row = {"upkeep": upkeep, **train_and_watch(ov, every=a.every)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
