"""Activations for contractive residual branches (kind ``activation``).

Each declares ``lipschitz`` (its Lipschitz constant, used by ``g``'s
certified bound) and ``width_factor`` (how many times wider its output is
than its input: CLipSwish concatenates two halves). All act on dim 1, so they
serve ``[B, D]`` vectors and ``[B, C, H, W]`` feature maps alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.registry import register

__all__ = ["ELU", "LipSwish", "CLipSwish", "Softplus", "ReLU", "Identity", "lipswish"]

# max_x d/dx [x sigmoid(beta x)] = 1.0998... for every beta > 0 (attained at
# beta x ~ 2.4); dividing by 1.1 makes LipSwish 1-Lipschitz.
LIPSWISH_SCALE = 1.1
# The concatenation [f(x), f(-x)] of CLipSwish has Jacobian norm up to 1.004
# times that of f (Residual Flows' CLipSwish constant).
CLIPSWISH_SCALE = 1.004


class _Activation(nn.Module):
    lipschitz: float = 1.0
    width_factor: int = 1


@register("activation", "elu", description="ELU (alpha=1): smooth, 1-Lipschitz (the i-ResNet paper's choice)")
class ELU(_Activation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x)


def lipswish(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(beta x) / 1.1``: 1-Lipschitz for every ``beta > 0``."""
    return x * torch.sigmoid(beta * x) / LIPSWISH_SCALE


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


@register("activation", "lipswish",
          description="LipSwish x*sigmoid(beta x)/1.1, learnable beta > 0 (Residual Flows): 1-Lipschitz, "
                      "derivative not saturating at 1")
class LipSwish(_Activation):
    """``beta = softplus(raw)`` keeps it positive (so the 1/1.1 bound holds) while learnable."""

    def __init__(self, beta: float = 1.0, learnable: bool = True):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"LipSwish beta must be positive, got {beta}")
        raw = torch.tensor(_inverse_softplus(beta))
        if learnable:
            self.raw_beta = nn.Parameter(raw)
        else:  # a buffer, never a parameter without a gradient (DDP)
            self.register_buffer("raw_beta", raw)

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lipswish(x, self.beta)


@register("activation", "clipswish",
          description="CLipSwish [LipSwish(x), LipSwish(-x)]/1.004 (i-DenseNets): 1-Lipschitz, doubles the width")
class CLipSwish(LipSwish):
    """Concatenating ``f(x)`` and ``f(-x)`` keeps information a single swish squashes."""

    width_factor = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta
        return torch.cat([lipswish(x, beta), lipswish(-x, beta)], dim=1) / CLIPSWISH_SCALE


@register("activation", "softplus", description="softplus log(1+e^x): 1-Lipschitz, smooth")
class Softplus(_Activation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


@register("activation", "relu", description="ReLU: 1-Lipschitz but not smooth (the log-det series needs C1; "
                                            "for classification only)")
class ReLU(_Activation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


@register("activation", "identity", description="identity (a linear g; for tests and ablations)")
class Identity(_Activation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
