"""Noise padding (Residual Flows' ``--padding``): the flow models the input augmented with noise.

The input ``x`` (``[B, C, ...]``) gets ``channels`` extra channels ``e`` (for vectors: extra
coordinates) drawn from a known density ``q``: ``uniform`` on ``[0, 1)`` (``log q(e) = 0``) or
``gaussian``, the standard normal. The flow is a bijection of the augmented ``(x, e)``, so its
``log p(x, e)`` is exact; what a model reports as ``log p(x)`` is then

    ``log p(x, e) - log q(e)``,   ``e ~ q``,

an unbiased (single-sample) estimate of ``E_q[log p(x, e) - log q(e)] <= log p(x)``: a lower
bound of the marginal likelihood (Jensen), exact as the likelihood of the augmented data. The
extra dimensions give the residual blocks room (a residual map cannot change the topology of
its input), at the price of that gap. Bits per dimension are counted over ``x`` alone.
"""

from __future__ import annotations

import torch
from torch import nn

from iresflow.models.priors import standard_normal_log_prob

__all__ = ["NoisePadding", "PADDING_DISTRIBUTIONS"]

PADDING_DISTRIBUTIONS = ("uniform", "gaussian")


class NoisePadding(nn.Module):
    """Append ``channels`` channels of noise ``e ~ q`` along dimension 1, and take them off again."""

    def __init__(self, channels: int, distribution: str = "uniform"):
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"padding channels must be >= 1, got {channels}")
        if distribution not in PADDING_DISTRIBUTIONS:
            raise ValueError(f"padding_distribution must be one of {', '.join(PADDING_DISTRIBUTIONS)}, "
                             f"not {distribution!r}")
        self.channels, self.distribution = int(channels), distribution

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """Noise for the batch ``x``: ``[B, channels, *x.shape[2:]]``."""
        shape = (x.shape[0], self.channels, *x.shape[2:])
        if self.distribution == "uniform":
            return torch.rand(shape, device=x.device, dtype=x.dtype)
        return torch.randn(shape, device=x.device, dtype=x.dtype)

    def log_q(self, e: torch.Tensor) -> torch.Tensor:
        """``log q(e)`` per sample (0 for the uniform density on ``[0, 1)``)."""
        if self.distribution == "uniform":
            return e.new_zeros(e.shape[0])
        return standard_normal_log_prob(e)

    def pad(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if e.shape[0] != x.shape[0] or e.shape[1] != self.channels or e.shape[2:] != x.shape[2:]:
            raise ValueError(f"padding noise of shape {tuple(e.shape)} does not fit inputs {tuple(x.shape)} "
                             f"({self.channels} channels)")
        return torch.cat([x, e.to(x.dtype)], dim=1)

    def strip(self, y: torch.Tensor) -> torch.Tensor:
        """Drop the padded channels (the inverse's last step)."""
        return y[:, : y.shape[1] - self.channels]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, distribution={self.distribution}"
