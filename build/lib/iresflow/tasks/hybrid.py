"""Hybrid models: density and classification jointly (registered task ``"hybrid"``).

Residual Flows (Chen et al. 2019, Sec. 5), after Nalisnick et al. (2019): one flow gives both
``log p(x)`` and, through a classifier head on its features, ``log p(y | x)``; training
maximises

    ``lambda * log p(x) + log p(y | x)``,

i.e. minimises ``loss = lambda * nll + cross_entropy`` (nats per sample; ``lambda`` is
``density_weight``: 1 is the joint likelihood ``log p(x, y)``, ``1 / D`` Residual Flows'
per-dimension weighting, 0 a classifier built on an invertible network). The heads
(:class:`iresflow.models.heads.FlowFeatureHeads`) read every scale's features (``head:
per_scale``, as Residual Flows) or the last scale's only (``final``); the flow's own options
(``factor_out``, ``fc_end``, padding, priors, block kinds) apply unchanged.

Everything the density task measures is measured here (NLL and bits/dim with the same
estimators, reconstruction error, solver and Lipschitz diagnostics, samples), and the
classification metrics beside it: top-1 (and top-k) accuracy and the cross-entropy, all
torchmetrics objects or ``sync_dist`` logs, reduced across DDP ranks. Batches are ``(x, y)``
of dequantised data (a density datamodule: ``data.task: density``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from iresflow.models.heads import FlowFeatureHeads
from iresflow.registry import register
from iresflow.tasks.classification import STAGES, accuracy_metrics, log_accuracy
from iresflow.tasks.density import DensityTask

__all__ = ["HybridTask"]


@register("task", "hybrid", description="lambda * log p(x) + log p(y|x): a classifier head on the flow's "
                                        "(per-scale) features; bits/dim and accuracy together")
class HybridTask(DensityTask):
    """Train a flow and a classifier head on its features jointly.

    Besides the density task's parameters (:class:`iresflow.tasks.density.DensityTask`, and
    through it the shared ones of :class:`iresflow.tasks.base.IResTask`):
      num_classes: from the datamodule; density_weight: ``lambda``;
      head: ``per_scale`` or ``final``; head_hidden: channels of each head (Residual Flows 256);
      label_smoothing; top_k: also report top-k accuracy (when there are more than k classes).
    """

    monitor_mode = "min"

    def __init__(self, model: nn.Module, *, num_classes: int = 10, density_weight: float = 1.0,
                 head: str = "per_scale", head_hidden: int = 256, label_smoothing: float = 0.0, top_k: int = 5,
                 **density: Any):
        super().__init__(model, **density)
        if not hasattr(model, "forward_pass") or not hasattr(model, "feature_shapes"):
            raise ValueError(f"the hybrid task needs a flow that hands out its features (iresnet_flow), "
                             f"not {type(model).__name__}")
        if int(num_classes) < 2:
            raise ValueError(f"the hybrid task needs at least 2 classes, got num_classes={num_classes}")
        if not float(density_weight) >= 0:
            raise ValueError(f"density_weight (lambda) must be >= 0, got {density_weight}")
        self.monitor = "val/loss"  # (the density task would monitor bits/dim)
        self.num_classes, self.density_weight = int(num_classes), float(density_weight)
        self.label_smoothing = float(label_smoothing)
        self.top_k = int(top_k) if top_k and int(top_k) < self.num_classes else None
        self.head = FlowFeatureHeads(model.feature_shapes, self.num_classes, int(head_hidden), head)
        metrics = accuracy_metrics(self.num_classes, self.top_k)
        metrics.update({f"{stage}_{name}": MeanMetric() for stage in STAGES[1:] for name in ("ce", "loss")})
        self._hybrid_metrics = nn.ModuleDict(metrics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.model.forward_pass(x).features)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass of the flow: ``log_prob`` per sample, the logits, the mean cross-entropy and
        ``loss = density_weight * mean(-log_prob) + cross_entropy``."""
        out = self.model.forward_pass(x)
        logp = self.model.log_prob_of(out)
        logits = self.head(out.features)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return {"log_prob": logp, "logits": logits, "ce": ce, "loss": self.density_weight * -logp.mean() + ce}

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        parts = self.losses(x, y)
        if not self.check_loss(parts["loss"], batch_idx):
            return None
        nll, bpd = self.density_terms(parts["log_prob"])
        self.log_training(parts["loss"], nll, bpd)
        self.log("train/ce", parts["ce"].detach(), sync_dist=True)
        log_accuracy(self, self._hybrid_metrics, "train", parts["logits"], y, self.top_k)
        return parts["loss"]

    def _eval_step(self, stage: str, batch, batch_idx: int) -> None:
        x, y = batch
        parts = {k: v.detach() for k, v in self.losses(x, y).items()}
        self.log_evaluation(stage, x, parts["log_prob"], batch_idx)
        log_accuracy(self, self._hybrid_metrics, stage, parts["logits"], y, self.top_k)
        for name in ("ce", "loss"):
            metric = self._hybrid_metrics[f"{stage}_{name}"]
            metric.update(parts[name], weight=len(y))
            self.log(f"{stage}/{name}", metric, prog_bar=name == "loss" and stage == "val")
