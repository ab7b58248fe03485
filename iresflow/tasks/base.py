"""What every task shares: optimiser and schedule, Lipschitz upkeep, non-finite losses, diagnostics.

The user never calls anything by hand: right after every optimiser step the task runs
the normalised layers' upkeep (:func:`iresflow.nn.lipschitz.keep_up_lipschitz`), before any
callback may checkpoint, so the stored singular vectors belong to the new weights. With the
default ``upkeep: converged`` each layer's top singular pair is recomputed (exactly, or by
warm-started Lanczos; :mod:`iresflow.nn.spectral_norm`), so the map the next forward applies
has norm ``c`` to float rounding (on the toy default the applied ``sigma / c`` reached 1.19
with the papers' one iteration per forward plus one per step); with ``upkeep:
power_iteration`` (the papers' scheme, an ablation) it runs ``lipschitz_iterations`` fixed
iterations on top of the model's ``n_iterations`` per training forward.

Evaluation never changes training. Validation, test and the final pictures set the
training's power-iteration state (every normalised layer's buffers) and random
generators (torch's, numpy's, Python's) aside, converge the vectors with
``lipschitz_eval_iterations`` more iterations for themselves (evaluation mode uses the
stored vectors without iterating), draw their own numbers (estimator probes, samples
for the pictures), and put the training's state back bit for bit afterwards. So how
often a run validates, or whether a resumed run validates again, never changes its
training.

Data parallel (DDP) rules the tasks keep: every rank runs the same power
iterations at the same points (never only rank 0), so the ``u``/``v`` buffers
stay identical; every decision that changes control flow (a skipped batch)
is reduced across ranks; metrics are torchmetrics objects or logged with
``sync_dist=True``; files and pictures are written by global rank 0 only; the
estimators' random draws differ between ranks (:meth:`IResTask.on_fit_start`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

__all__ = [
    "IResTask",
    "estimator_names",
    "NonFiniteLossError",
    "LRSchedule",
    "SCHEDULERS",
    "random_state",
    "set_random_state",
    "lipschitz_state",
    "restore_lipschitz_state",
]

SCHEDULERS = ("none", "multistep", "cosine")
NONFINITE = ("raise", "skip")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite (``task.on_nonfinite=raise``, or too many skips in a row)."""


def random_state() -> dict[str, Any]:
    """Every random generator a run draws from: torch (CPU and each CUDA device), numpy, Python.

    Tensors, numbers and lists only, so a checkpoint holding it loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": list(random.getstate())}


def set_random_state(state: dict[str, Any]) -> None:
    """Put back what :func:`random_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class LRSchedule:
    """Learning-rate factor per optimiser step: linear warm-up times a decay.

    ``multistep``: ``gamma ** (number of milestones <= epoch)`` with epoch =
    step // steps_per_epoch (the i-ResNet schedule); ``cosine``: half a cosine
    from 1 to 0 over ``total_steps``. A plain object (not a closure) so the
    scheduler's state is saved with the checkpoint.
    """

    def __init__(self, kind: str = "none", warmup_steps: int = 0, milestones: Sequence[int] = (),
                 gamma: float = 0.1, steps_per_epoch: int = 1, total_steps: int | None = None):
        if kind not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
        if kind == "cosine" and not total_steps:
            raise ValueError("the cosine schedule needs a finite number of steps (trainer.max_steps "
                             "or trainer.max_epochs)")
        self.kind, self.warmup_steps = kind, int(warmup_steps)
        self.milestones, self.gamma = sorted(int(m) for m in milestones), float(gamma)
        self.steps_per_epoch, self.total_steps = max(1, int(steps_per_epoch)), total_steps

    def __call__(self, step: int) -> float:
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.kind == "multistep":
            epoch = step // self.steps_per_epoch
            factor *= self.gamma ** sum(epoch >= m for m in self.milestones)
        elif self.kind == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        return factor


def _lipschitz_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "power_iteration")]


def lipschitz_state(module: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor | None], Any]]:
    """A copy of every spectrally normalised layer's power-iteration state: its buffers (``u``,
    ``v``, ``sigma``, ...) and the input size a convolution learns at its first forward."""
    return [(m, {k: None if b is None else b.detach().clone() for k, b in m._buffers.items()},
             getattr(m, "input_size", None)) for m in _lipschitz_layers(module)]


def restore_lipschitz_state(state: list[tuple[nn.Module, dict[str, torch.Tensor | None], Any]]) -> None:
    """Put back what :func:`lipschitz_state` copied, bit for bit (in place where the shapes agree,
    so the tensors DDP broadcasts and ``state_dict`` holds stay the same objects)."""
    for layer, buffers, input_size in state:
        for name, saved in buffers.items():
            current = layer._buffers.get(name)
            if saved is not None and current is not None and current.shape == saved.shape:
                with torch.no_grad():
                    current.copy_(saved)
            else:
                layer._buffers[name] = saved
        if hasattr(layer, "input_size"):
            layer.input_size = input_size
        if hasattr(layer, "mark_kept"):  # the training's vectors, for the training's weights (back in place)
            layer.mark_kept()


def _constrained(block: nn.Module) -> bool:
    """Whether the block is built to be invertible (its residual functions' normalisations constrain)."""
    check = getattr(block, "invertible_by_construction", None)
    if check is not None:
        return bool(check())
    norm = getattr(getattr(block, "g", None), "normalization", None)  # a plugin block without the base class
    return bool(getattr(norm, "constrains", True))


def estimator_names(block: nn.Module) -> tuple[str, ...]:
    """The attributes of ``block`` that hold its log-det estimators (``estimator`` for a residual
    block, ``estimator_x`` and ``estimator_z`` for an implicit one)."""
    names = getattr(block, "estimator_names", None)
    if names is not None:
        return tuple(names)
    return ("estimator",) if hasattr(block, "estimator") else ()


class IResTask(LightningModule):
    """Base of the tasks: ``model`` is the network; the rest are training settings.

    Parameters shared by every task (see ``configs/task/*.yaml``; a task takes them as ``**common``,
    and the registry follows them up to this signature, so it checks every key of a task node):
      optimizer: a factory ``params -> torch.optim.Optimizer`` (from the node
        ``task.optimizer: {name: adam, lr: ...}``; default Adam, lr 1e-3). It is tried once
        on a placeholder parameter when the task is built, so a bad value is reported then.
      scheduler ("none", "multistep", "cosine"), milestones (epochs), gamma,
      warmup_steps / warmup_epochs: the per-step learning-rate schedule.
      lipschitz_iterations: with the layers' ``upkeep: power_iteration``, power iterations after
        each optimiser step, on top of their own in the training forward (0: those alone); the
        default ``upkeep: converged`` iterates to convergence instead.
      lipschitz_eval_iterations: before validation / test / sampling.
      on_nonfinite: "raise" (stop, naming the step and the last good checkpoint)
        or "skip" (drop the batch, count it in ``train/skipped_batches``);
      max_consecutive_skips: with "skip", stop the run when this many batches in a row
        were skipped (the run diverged).
      ema_decay: an exponential moving average of the weights with this decay (Residual
        Flows: 0.999) is what validation, test, the pictures, the final checkpoint and
        therefore ``iresflow eval`` / ``sample`` use (:class:`iresflow.tasks.ema.LipschitzEMA`,
        Lightning's ``EMAWeightAveraging``); None: off.
    """

    #: the metric checkpoints call "best", and whether lower is better
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __init__(self, model: nn.Module, *, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: str = "none", milestones: Sequence[int] = (), gamma: float = 0.1,
                 warmup_steps: int = 0, warmup_epochs: int = 0, lipschitz_iterations: int = 1,
                 lipschitz_eval_iterations: int = 10, on_nonfinite: str = "raise",
                 max_consecutive_skips: int = 10, ema_decay: float | None = None):
        super().__init__()
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) (Residual Flows: 0.999), or be null for no EMA; "
                             f"got {ema_decay}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE}, not {on_nonfinite!r}")
        if int(max_consecutive_skips) < 1:
            raise ValueError(f"max_consecutive_skips must be at least 1, got {max_consecutive_skips}")
        if isinstance(optimizer, (str, dict)):
            raise TypeError(f"optimizer={optimizer!r}: pass a factory (registry.factory('optimizer', node)); "
                            "names are resolved by the registry")
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=1e-3)
        self.optimizer_factory(params=[nn.Parameter(torch.zeros(1))])  # a bad lr etc. fails now, not in fit
        self.model = model
        self.scheduler_name, self.milestones, self.gamma = scheduler, tuple(milestones), float(gamma)
        self.warmup_steps, self.warmup_epochs = int(warmup_steps), int(warmup_epochs)
        self.lipschitz_iterations = int(lipschitz_iterations)
        self.lipschitz_eval_iterations = int(lipschitz_eval_iterations)
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self._ema_callback: Any = None
        #: the resolved run config, saved inside every checkpoint (set by the run layer)
        self.run_config: dict[str, Any] | None = None
        #: PNG files written by this task (newest last)
        self.picture_paths: list[Path] = []
        self.skipped_batches = 0
        self.consecutive_skips = 0
        self._training_random_state: dict[str, Any] | None = None
        self._training_lipschitz_state: list[Any] | None = None

    # ------------------------------------------------------------------ optimisation
    def _steps_per_epoch(self) -> int:
        trainer = self._trainer
        if trainer is None:  # unit use, outside a trainer
            return 1
        total = trainer.estimated_stepping_batches  # also loads the train dataloader
        n = trainer.num_training_batches
        if n is None or not math.isfinite(n):
            return max(1, int(total)) if math.isfinite(total) else 1
        return max(1, math.ceil(n / max(1, trainer.accumulate_grad_batches)))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params=params)
        if self.scheduler_name == "none" and not (self.warmup_steps or self.warmup_epochs):
            return opt
        steps_per_epoch = self._steps_per_epoch()
        total = None
        if self._trainer is not None:
            estimated = self._trainer.estimated_stepping_batches
            total = int(estimated) if math.isfinite(estimated) else None
        warmup = self.warmup_steps + self.warmup_epochs * steps_per_epoch
        schedule = LRSchedule(self.scheduler_name, warmup, self.milestones, self.gamma, steps_per_epoch, total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_callbacks(self) -> list[Any]:
        """The EMA of the weights when ``ema_decay`` is set (Lightning adds it to the trainer)."""
        if self.ema_decay is None:
            return []
        if self._ema_callback is None:  # one for the task's life: trainer.test after fit keeps its state
            from iresflow.tasks.ema import LipschitzEMA

            self._ema_callback = LipschitzEMA(self.ema_decay)
        return [self._ema_callback]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        skipped_before = self.skipped_batches
        super().optimizer_step(*args, **kwargs)  # (runs training_step: the closure)
        trainer = self._trainer
        if self.skipped_batches > skipped_before and (trainer is None or trainer.accumulate_grad_batches == 1):
            return  # its batch was skipped: no gradient, the weights did not move, nothing to keep up
        # Right after the step (before any callback may checkpoint): keep u, v of the normalised
        # layers converged to the new weights. Every rank runs the same iterations on the same
        # (all-reduced) weights, so the vectors stay identical across ranks.
        self.update_lipschitz(self.lipschitz_iterations)
        # Modules that count optimiser steps (the dense layers' frozen concatenation weights).
        for module in self.modules():
            if module is not self and hasattr(module, "on_optimizer_step"):
                module.on_optimizer_step()
        if self._ema_callback is not None and self._trainer is not None:
            # the average, with this step (Lightning counts the step in global_step once this hook returns)
            self._ema_callback.after_optimizer_step(self, steps_done=self._trainer.global_step + 1)

    # ------------------------------------------------------------------ Lipschitz upkeep
    def update_lipschitz(self, n_iterations: int) -> None:
        """The normalised layers' upkeep: converge their vectors (``upkeep: converged``) or run
        ``n_iterations`` power iterations (``upkeep: power_iteration``)."""
        from iresflow.nn.lipschitz import keep_up_lipschitz

        keep_up_lipschitz(self.model, n_iterations=n_iterations)

    def on_fit_start(self) -> None:
        # Lightning seeds every rank alike, so without this the Hutchinson probes and the
        # Russian-roulette draws would repeat on every rank: still unbiased, but the ranks'
        # estimates would be correlated. Each rank gets its own stream (model parameters are
        # unaffected: DDP broadcasts them from rank 0 when it wraps the model). A resumed run
        # gets each rank's saved stream back afterwards (the run layer's random-state callback).
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            seed = (torch.initial_seed() + 1_000_003 * trainer.global_rank) % (2**63)
            torch.manual_seed(seed)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/skipped_batches", float(self.skipped_batches), sync_dist=False, reduce_fx="max")

    def training_random_state(self) -> dict[str, Any]:
        """The training's random generators: as they were before the current evaluation, if any."""
        return self._training_random_state or random_state()

    def begin_evaluation(self) -> None:
        """Set the training's state aside, then converge the vectors for the evaluation.

        The evaluation works on its own copy of the power-iteration state and draws its own random
        numbers; :meth:`end_evaluation` puts the training's back bit for bit. So neither how often
        a run validates nor a resume that skips a validation changes the training.
        """
        self._training_random_state = random_state()
        self._training_lipschitz_state = lipschitz_state(self)
        self.update_lipschitz(self.lipschitz_eval_iterations)

    def end_evaluation(self) -> None:
        """Put back what :meth:`begin_evaluation` set aside (nothing when it was not called)."""
        if self._training_lipschitz_state is not None:
            restore_lipschitz_state(self._training_lipschitz_state)
            self._training_lipschitz_state = None
        if self._training_random_state is not None:
            set_random_state(self._training_random_state)
            self._training_random_state = None

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """:meth:`begin_evaluation` ... :meth:`end_evaluation` around a block (e.g. final pictures)."""
        self.begin_evaluation()
        try:
            yield
        finally:
            self.end_evaluation()

    def on_validation_start(self) -> None:
        self.begin_evaluation()

    def on_validation_end(self) -> None:
        self.end_evaluation()

    def on_test_start(self) -> None:
        self.begin_evaluation()

    def on_test_end(self) -> None:
        self.end_evaluation()

    # ------------------------------------------------------------------ non-finite losses
    def last_good_checkpoint(self) -> str | None:
        """The newest checkpoint file of this run, if any."""
        trainer = self._trainer
        candidates: list[Path] = []
        if trainer is not None:
            for cb in trainer.checkpoint_callbacks:
                for attr in ("last_model_path", "best_model_path"):
                    p = getattr(cb, attr, "")
                    if p and Path(p).is_file():
                        candidates.append(Path(p))
                dirpath = getattr(cb, "dirpath", None)
                if dirpath and Path(dirpath).is_dir():
                    candidates.extend(Path(dirpath).glob("*.ckpt"))
        if not candidates:
            return None
        return str(max(candidates, key=lambda p: p.stat().st_mtime))

    def check_loss(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """True when the loss may be used; raises or counts a skip otherwise.

        Every rank takes the same decision (a non-finite loss on any rank
        counts), so DDP never deadlocks with some ranks skipping.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive_skips = 0
            return True
        where = (f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})")
        ckpt = self.last_good_checkpoint()
        resume = (f"the last good checkpoint is {ckpt} (resume with ckpt_path={ckpt})"
                  if ckpt else "no checkpoint has been saved yet")
        if self.on_nonfinite == "skip":
            self.skipped_batches += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"{self.consecutive_skips} batches in a row had a non-finite loss (up to {where}; "
                    f"{self.skipped_batches} skipped in all): the run diverged; {resume}. Lower the learning "
                    "rate or the Lipschitz coefficient (task.max_consecutive_skips sets this limit)")
            self.print(f"warning: non-finite loss at {where}; batch skipped "
                       f"({self.skipped_batches} so far, task.on_nonfinite=skip)")
            return False
        raise NonFiniteLossError(
            f"non-finite loss ({loss.detach().flatten()[0].item()}) at {where}; {resume}. "
            "Lower the learning rate or the Lipschitz coefficient, or set task.on_nonfinite=skip "
            "to drop such batches.")

    # ------------------------------------------------------------------ diagnostics
    def blocks(self) -> list[nn.Module]:
        return list(getattr(self.model, "blocks", []) or [])

    def block_diagnostics(self) -> dict[str, float]:
        """Estimator terms, the last inverse solves and the certified Lipschitz bound."""
        out: dict[str, float] = {}
        blocks = self.blocks()
        estimators = [getattr(b, name) for b in blocks for name in estimator_names(b)]
        terms = [float(e.last_n_terms) for e in estimators if getattr(e, "last_n_terms", None) is not None]
        if terms:
            out["estimator_terms"] = sum(terms) / len(terms)
        infos = [b.last_solve_info for b in blocks if getattr(b, "last_solve_info", None) is not None]
        if infos:
            out["solver_iterations"] = sum(i.iterations for i in infos) / len(infos)
            out["solver_iterations_max"] = float(max(i.iterations for i in infos))
            out["solver_converged"] = sum(bool(i.converged) for i in infos) / len(infos)
            out["solver_residual_max"] = float(max(float(i.residual) for i in infos))
        bounds = []
        for b in blocks:
            # the bound is certified by the residual functions (the block reports the largest); a
            # plugin without ``lipschitz_bound`` certifies none, and then there is nothing to report
            functions = b.residual_functions() if hasattr(b, "residual_functions") else [getattr(b, "g", b)]
            if all(hasattr(g, "lipschitz_bound") for g in functions):
                bounds.append(max(float(g.lipschitz_bound()) for g in functions))
        if bounds:
            out["lipschitz_max"] = max(bounds)
        if blocks:
            # 0 for a deliberately unconstrained model (normalization none: the paper's Vanilla),
            # whose inverse is expected to fail: the run reports it without failing on it
            out["invertible_by_construction"] = float(all(_constrained(b) for b in blocks))
        return out

    def reset_solve_info(self) -> None:
        for b in self.blocks():
            if hasattr(b, "last_solve_info"):
                b.last_solve_info = None

    # ------------------------------------------------------------------ pictures
    @property
    def output_dir(self) -> Path:
        trainer = self._trainer
        root = trainer.default_root_dir if trainer is not None else os.getcwd()
        return Path(root)

    def log_picture(self, key: str, path: Path) -> None:
        """Send a PNG to every image-capable logger (W&B)."""
        self.picture_paths.append(Path(path))
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if log_image is not None:
                try:
                    log_image(key=key, images=[str(path)], step=self.global_step)
                except Exception as err:  # a logging failure must not kill the run
                    self.print(f"warning: could not log {path} to {type(logger).__name__}: {err}")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["iresflow_config"] = self.run_config
        checkpoint["iresflow_skipped_batches"] = self.skipped_batches
        checkpoint["iresflow_consecutive_skips"] = self.consecutive_skips

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = int(checkpoint.get("iresflow_skipped_batches", 0))
        self.consecutive_skips = int(checkpoint.get("iresflow_consecutive_skips", 0))
