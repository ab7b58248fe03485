"""Example plugin: the GroupSort activation (Anil, Lucas & Grosse, 2019).

Any ``*.py`` file in this folder is imported when iresflow starts, so the
``@register`` below makes ``model.activation=groupsort`` usable from any config
line, with no change to the package. Copy this file to start your own plugin.

GroupSort sorts the features in groups of ``group_size`` along the channel
dimension. It only permutes its input, so it is 1-Lipschitz and, unlike ELU or
LipSwish, norm-preserving in its gradient: a good fit for contractive residual
branches.
"""

import torch
from torch import nn

from iresflow.registry import register


@register("activation", "groupsort",
          description="GroupSort: sort features in groups (1-Lipschitz, gradient-norm preserving)")
class GroupSort(nn.Module):
    lipschitz = 1.0  # a permutation of the input, chosen per sample
    width_factor = 1

    def __init__(self, group_size: int = 2):
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c % self.group_size:
            raise ValueError(f"GroupSort({self.group_size}) needs a channel count divisible by it, got {c}")
        # Sort inside groups along dim 1 (works for [B, C] and [B, C, H, W]).
        grouped = x.unflatten(1, (c // self.group_size, self.group_size))
        return grouped.sort(dim=2).values.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"
