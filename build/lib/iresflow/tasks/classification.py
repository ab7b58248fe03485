"""Classification with an i-ResNet (registered task ``"classification"``).

Cross-entropy on the logits of ``model(x)``; top-1 (and top-k) accuracy with
torchmetrics, reduced across DDP ranks. On the first validation batch the
invertibility of the blocks is checked: each block's input is captured,
sent through the block and back through its inverse, and the largest RMS error
is logged (``val/recon_error``), with the solver's iterations and convergence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from iresflow.registry import register
from iresflow.tasks.base import IResTask

__all__ = ["ClassificationTask", "accuracy_metrics", "log_accuracy"]

STAGES = ("train", "val", "test")


def accuracy_metrics(num_classes: int, top_k: int | None) -> dict[str, nn.Module]:
    """Top-1 (and top-k) accuracy per stage, ``{stage}_acc`` / ``{stage}_acc_top{k}``.

    torchmetrics reduces epoch values across DDP ranks; the per-step training values too
    (``dist_sync_on_step``), so a logged step accuracy is the global batch's, not rank 0's."""
    metrics: dict[str, nn.Module] = {}
    for stage in STAGES:
        sync = {"dist_sync_on_step": stage == "train"}
        metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes, top_k=1, average="micro", **sync)
        if top_k:
            metrics[f"{stage}_acc_top{top_k}"] = MulticlassAccuracy(num_classes, top_k=top_k, average="micro",
                                                                    **sync)
    return metrics


def log_accuracy(task: IResTask, metrics: nn.ModuleDict, stage: str, logits: torch.Tensor, y: torch.Tensor,
                 top_k: int | None) -> None:
    """Update the stage's accuracy metrics from ``accuracy_metrics`` and log them (``{stage}/acc``)."""
    on_step = stage == "train"
    metrics[f"{stage}_acc"](logits.detach(), y)
    task.log(f"{stage}/acc", metrics[f"{stage}_acc"], prog_bar=True, on_step=on_step, on_epoch=True)
    if top_k:
        name = f"{stage}_acc_top{top_k}"
        metrics[name](logits.detach(), y)
        task.log(f"{stage}/acc_top{top_k}", metrics[name], on_step=on_step, on_epoch=True)


@register("task", "classification", description="cross-entropy, top-1/top-k accuracy, block inverse checks")
class ClassificationTask(IResTask):
    """Train a classifier; the paper's optimiser (SGD, momentum, step schedule, warm-up) by config.

    Besides the shared parameters (:class:`iresflow.tasks.base.IResTask`: optimizer, scheduler,
    milestones, gamma, warmup_steps, warmup_epochs, lipschitz_iterations,
    lipschitz_eval_iterations, on_nonfinite, max_consecutive_skips):
      num_classes: from the datamodule; label_smoothing; top_k: also report
      top-k accuracy when there are more than ``top_k`` classes;
      check_inverse: log the blocks' reconstruction error on a validation batch.
    """

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, model: nn.Module, *, num_classes: int = 10, label_smoothing: float = 0.0,
                 top_k: int = 5, check_inverse: bool = True, **common: Any):
        super().__init__(model, **common)
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got num_classes={num_classes}")
        self.label_smoothing = float(label_smoothing)
        self.top_k = int(top_k) if top_k and int(top_k) < self.num_classes else None
        self.check_inverse = bool(check_inverse)
        # the factories stay out: the run config (in every checkpoint) holds their nodes
        self.save_hyperparameters(ignore=["model", "optimizer", "eval_estimator"])
        metrics = accuracy_metrics(self.num_classes, self.top_k)
        metrics.update({f"{stage}_loss": MeanMetric() for stage in STAGES})
        self._metrics = nn.ModuleDict(metrics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, stage: str, batch, batch_idx: int):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if stage == "train" and not self.check_loss(loss, batch_idx):
            return None
        log_accuracy(self, self._metrics, stage, logits, y, self.top_k)
        if stage == "train":
            self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=True)
        else:
            self._metrics[f"{stage}_loss"].update(loss.detach(), weight=len(y))
            self.log(f"{stage}/loss", self._metrics[f"{stage}_loss"])
        return loss

    def training_step(self, batch, batch_idx: int):
        loss = self._step("train", batch, batch_idx)
        if loss is not None and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            diag = self.block_diagnostics()
            if "lipschitz_max" in diag:
                self.log("train/lipschitz_max", float(diag["lipschitz_max"]), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step("val", batch, batch_idx)
        if batch_idx == 0 and self.check_inverse:
            self._log_inverse_check("val", batch[0])

    def test_step(self, batch, batch_idx: int) -> None:
        self._step("test", batch, batch_idx)
        if batch_idx == 0 and self.check_inverse:
            self._log_inverse_check("test", batch[0])

    @torch.no_grad()
    def block_reconstruction_error(self, x: torch.Tensor) -> float | None:
        """Largest RMS of ``block.inverse(block(h)) - h`` over the blocks, ``h`` each block's input."""
        blocks = [b for b in self.blocks() if hasattr(b, "inverse")]
        if not blocks:
            return None
        inputs: dict[int, torch.Tensor] = {}
        hooks = [b.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
                 for i, b in enumerate(blocks)]
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        self.reset_solve_info()
        worst = 0.0
        for i, b in enumerate(blocks):
            if i not in inputs:
                continue
            h = inputs[i]
            rec = b.inverse(b(h))
            worst = max(worst, float((rec - h).flatten(1).pow(2).mean(1).sqrt().max()))
        return worst

    def _log_inverse_check(self, stage: str, x: torch.Tensor) -> None:
        err = self.block_reconstruction_error(x[:32])
        if err is None:
            return
        self.log(f"{stage}/recon_error", err, sync_dist=True)
        for key, value in self.block_diagnostics().items():
            self.log(f"{stage}/{key}", float(value), sync_dist=True)
