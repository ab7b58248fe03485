"""Example plugin: a Frobenius-norm normalisation (kind ``normalization``, name ``frobenius``).

Any ``*.py`` file in this folder is imported when iresflow starts, so the
``@register`` below makes ``model.normalization=frobenius`` usable from any
config line. Copy this file to start your own normalisation.

``W <- W / max(1, b(W) / c)`` with a bound ``b`` that needs no power iteration:

- dense layer: ``b = ||W||_F``, since the spectral norm is at most the Frobenius norm;
- k x k convolution (any stride, zero padding): ``b = sqrt(k_h k_w) ||W||_F``. The
  convolution is a sum over its ``T = k_h k_w`` taps of a channel mixing ``W_t``
  followed by a shift (a zero-padded shift, or a subsampled one, has norm <= 1), so
  ``||conv|| <= sum_t ||W_t||_2 <= sum_t ||W_t||_F <= sqrt(T) ||W||_F`` (Cauchy-Schwarz).

The bound is certified but loose (a random 64 x 64 matrix has ``||W||_F`` about 4x
its spectral norm), so the layers are more constrained than with ``operator``: the
trade-off this plugin lets you measure.

What a normalisation must provide (see ``iresflow/nn/normalization.py``):
``linear(in_features, out_features, coeff)`` and
``conv2d(in_channels, out_channels, kernel_size, padding, input_size, coeff)``,
returning ``nn.Linear`` / ``nn.Conv2d`` subclasses with ``weight_for(x)`` (the weight
the forward applies: the log-det estimators use it for their fast Jacobian path) and
``lipschitz_constant()`` (the bound reported for ``Lip``); and the flags
``constrains`` / ``certifies``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.nn.normalization import Normalization
from iresflow.registry import register


def _scaled(weight: torch.Tensor, bound: torch.Tensor, coeff: float) -> torch.Tensor:
    """``W / max(1, bound / c)``, differentiable in ``W`` (the bound's dependence included)."""
    return weight / torch.clamp(bound / coeff, min=1.0)


class FrobeniusLinear(nn.Linear):
    """``nn.Linear`` with ``||W||_F <= coeff`` (hence spectral norm <= coeff)."""

    def __init__(self, in_features: int, out_features: int, coeff: float):
        super().__init__(in_features, out_features)
        self.coeff = float(coeff)

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled(self.weight, torch.linalg.vector_norm(self.weight), self.coeff)

    def lipschitz_constant(self) -> float:
        with torch.no_grad():
            return float(torch.linalg.vector_norm(self.weight_for(self.weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x), self.bias)


class FrobeniusConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``sqrt(k_h k_w) ||W||_F <= coeff`` (hence operator norm <= coeff)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int, coeff: float):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.coeff = float(coeff)
        self.taps = math.prod(self.kernel_size)

    def _bound(self, weight: torch.Tensor) -> torch.Tensor:
        return math.sqrt(self.taps) * torch.linalg.vector_norm(weight)

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled(self.weight, self._bound(self.weight), self.coeff)

    def lipschitz_constant(self) -> float:
        with torch.no_grad():
            return float(self._bound(self.weight_for(self.weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_for(x), self.bias, self.stride, self.padding)


@register("normalization", "frobenius",
          description="example plugin: W / max(1, b/c) with b = sqrt(taps) ||W||_F (certified, loose, "
                      "no power iteration)")
class FrobeniusNormalization(Normalization):
    """A certified bound from the Frobenius norm (no power iteration, no buffers)."""

    constrains = True
    certifies = True

    def __init__(self):  # no power-iteration settings: the residual's defaults are not passed in
        super().__init__(n_iterations=0)

    def linear(self, in_features, out_features, coeff):
        return FrobeniusLinear(in_features, out_features, coeff)

    def conv2d(self, in_channels, out_channels, kernel_size, padding, input_size, coeff):
        return FrobeniusConv2d(in_channels, out_channels, kernel_size, padding, coeff)
