"""Classifier heads on a flow's features, for hybrid models (``task=hybrid``).

Residual Flows' hybrid model (Chen et al. 2019, Sec. 5; ``resflow.py``
``build_multiscale_classifier``): for every scale, the feature map the flow hands on (the
factored-out half, or the squeezed features when nothing is factored out; the last scale's
output last) goes through a 3x3 convolution to ``hidden`` channels, ActNorm, ReLU and a
global average pool; the pooled vectors are concatenated and a linear layer gives the
logits. ``which="final"`` keeps only the last scale's head (the features at the end of the
flow). Vector features take a linear map instead of the convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from iresflow.nn.layers import ActNorm

__all__ = ["FlowFeatureHeads", "HEADS"]

HEADS = ("per_scale", "final")


class _Head(nn.Module):
    """One feature map (or vector) -> ``hidden`` pooled features."""

    def __init__(self, shape: Sequence[int], hidden: int):
        super().__init__()
        image = len(shape) == 3
        self.map = nn.Conv2d(shape[0], hidden, 3, padding=1) if image else nn.Linear(shape[0], hidden)
        self.norm = ActNorm(hidden)
        self.pool = nn.AdaptiveAvgPool2d(1) if image else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.norm(self.map(h)))).flatten(1)


class FlowFeatureHeads(nn.Module):
    """Logits ``[B, num_classes]`` from the list of per-scale features of a flow pass.

    Args:
        feature_shapes: the per-sample shape of each feature (the flow's ``feature_shapes``).
        num_classes: outputs.
        hidden: channels of each head (Residual Flows' ``--cdim``, 256).
        which: ``per_scale`` (a head on every scale) or ``final`` (on the last only).
    """

    def __init__(self, feature_shapes: Sequence[Sequence[int]], num_classes: int, hidden: int = 256,
                 which: str = "per_scale"):
        super().__init__()
        if which not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {which!r}")
        if int(hidden) < 1:
            raise ValueError(f"head_hidden must be at least 1, got {hidden}")
        shapes = [tuple(s) for s in feature_shapes]
        self.which = which
        self.used = list(range(len(shapes))) if which == "per_scale" else [len(shapes) - 1]
        self.heads = nn.ModuleList(_Head(shapes[i], int(hidden)) for i in self.used)
        self.logits = nn.Linear(int(hidden) * len(self.used), int(num_classes))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = [head(features[i]) for head, i in zip(self.heads, self.used)]
        return self.logits(torch.cat(pooled, 1))
