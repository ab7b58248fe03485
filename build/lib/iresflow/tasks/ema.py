"""The exponential moving average of the weights, for models with spectrally normalised layers.

Residual Flows (``train_img.py --ema-val``, decay 0.999) evaluate and sample with an EMA of the
weights, ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every optimiser step
(the first step copies ``theta``). :class:`LipschitzEMA` is Lightning's ``EMAWeightAveraging``
(torch's ``AveragedModel``) with what these models need:

- only the parameters are averaged (``use_buffers=False``); the buffers -- power-iteration
  vectors, ActNorm's initialised flag, step counters -- follow the model: an average of unit
  vectors is not a unit vector and an average of counters means nothing;
- right after the averaged weights are swapped in for a validation, every normalised layer
  runs ``lipschitz_eval_iterations`` power iterations on them, so the maps applied, the
  certified bound and the inverse's guarantee are those of the averaged weights (the vectors
  of the training weights underestimate the norms of other weights);
- the averaged weights stay in until the validation has ended, so the task's pictures at the
  end of a validation are drawn with them too (Lightning swaps back at the epoch end, before
  the task's own epoch-end hook);
- the swap back restores the training's weights *and* buffers exactly (buffers are swapped
  too), so validating with the average never changes the training, and a resumed run
  continues bit for bit: a checkpoint holds the averaged state in ``state_dict`` (what
  ``iresflow eval`` / ``sample`` load), the training state in ``current_model_state`` and the
  average's step count in ``averaging_state`` (Lightning's layout);
- at the end of training the averaged weights are swapped into the model (Lightning copies
  them; a swap keeps the training state, so the final ``last.ckpt`` still resumes a longer
  run exactly) and the vectors converged to them: the test, the final pictures and
  ``last.ckpt``'s ``state_dict`` use the average.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

__all__ = ["LipschitzEMA"]


def _match_buffers(average: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give the average the model's buffers where a layer replaced one after the copy was made
    (a convolution's power-iteration vectors are made at its first forward when its input
    size was not given)."""
    ours = dict(average.named_buffers())
    for name, buffer in model.named_buffers():
        if name in ours and ours[name].shape != buffer.shape:
            owner, _, leaf = name.rpartition(".")
            average.get_submodule(owner)._buffers[leaf] = buffer.detach().clone()


class LipschitzEMA(EMAWeightAveraging):
    """EMA of the parameters with the spectral norms kept consistent (see the module notes)."""

    def __init__(self, decay: float = 0.999):
        super().__init__(decay=float(decay), use_buffers=False)
        self.decay = float(decay)
        self._buffers_matched = False
        self._swapped = False  # the average is in the model (during a validation)

    def _converge(self, pl_module: Any) -> None:
        """Converge the vectors of the average just swapped in, starting from the training's own
        (which the swap moved into the average module): where they start then depends on the
        training alone, not on what an earlier validation left in the average module."""
        from iresflow.tasks.base import lipschitz_state, restore_lipschitz_state

        if self._average_model is not None:
            training = lipschitz_state(self._average_model.module)
            layers = [layer for layer, _, _ in lipschitz_state(pl_module)]
            restore_lipschitz_state([(mine, buffers, size) for mine, (_, buffers, size) in zip(layers, training)])
        update = getattr(pl_module, "update_lipschitz", None)
        if update is not None:
            update(int(getattr(pl_module, "lipschitz_eval_iterations", 10)))

    def after_optimizer_step(self, pl_module, steps_done: int) -> None:
        """Average in the weights of the step just taken (``steps_done`` optimiser steps so far).
        Called by the task right after the optimiser step and the Lipschitz upkeep (Residual
        Flows: ``optimizer.step(); update_lipschitz(model); ema.apply()``), so every checkpoint
        written at the end of the batch -- a stop signal's too, whose callback runs before this
        one's batch-end hook -- holds an average that includes the step."""
        if self._average_model is None:
            return
        if not self._buffers_matched:
            _match_buffers(self._average_model.module, pl_module)
            self._buffers_matched = True
        if steps_done > self._latest_update_step and self.should_update(step_idx=steps_done - 1):
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = steps_done

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """(The average is updated in :meth:`after_optimizer_step`.)"""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)  # the average in, the training state into the average module
            self._swapped = True
            self._converge(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """(Swapped back in :meth:`on_validation_end`, after the task's epoch-end pictures.)"""

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._average_model is not None and self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._swapped and "current_model_state" in checkpoint:
            # a checkpoint in the middle of a validation (a stop signal): the model holds the average
            # and the average module the training state, so the two entries trade places
            checkpoint["state_dict"], checkpoint["current_model_state"] = (checkpoint["current_model_state"],
                                                                           checkpoint["state_dict"])

    def on_train_end(self, trainer, pl_module) -> None:
        """The average into the model for what follows (test, pictures, the final checkpoint); the
        training state is kept in the average module, so a checkpoint written now still holds it
        as ``current_model_state`` and a longer run resumed from it continues the training."""
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)
            self._swapped = True
            self._converge(pl_module)
