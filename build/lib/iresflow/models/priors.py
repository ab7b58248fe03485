"""The base distribution of a flow's latent ``z``: the registered kind ``prior`` (the model option
``prior``, a name or a ``{name: ..., ...}`` node).

- ``standard``: ``N(z; 0, I)``.
- ``learned``: i-ResNet's learned diagonal Gaussian ``N(z; mu, diag(exp(2 s)))`` with a mean
  and a log standard deviation per dimension of ``z`` -- so every factored-out piece and every
  position of every scale has its own -- both starting at zero (the standard normal).

A prior is an ``nn.Module`` built with ``num_dims`` (the flow's latent size, every factored piece
included, flattened) that has ``log_prob(z)`` -- per sample, summed over every dimension, in at least
float32 (also under mixed precision) -- and ``sample(n, temperature)`` (``[n, num_dims]``; for the
Gaussians ``mu + temperature * sigma * eps``). A plugin registers one under kind ``prior``
(``registry/logistic_prior.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from iresflow.registry import Factory, register

__all__ = ["StandardNormalPrior", "LearnedGaussianPrior", "standard_normal_log_prob", "build_prior"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample, summed over every non-batch dimension."""
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z * z).sum(1) - z.shape[1] * _HALF_LOG_2PI


def _accumulate(z: torch.Tensor) -> torch.Tensor:
    """``z`` flattened, in (at least) float32."""
    return z.reshape(z.shape[0], -1).to(torch.promote_types(z.dtype, torch.float32))


@register("prior", "standard", description="standard normal N(0, I) over the latent z (the default)")
class StandardNormalPrior(nn.Module):
    """``N(0, I)`` over ``num_dims`` dimensions."""

    def __init__(self, num_dims: int):
        super().__init__()
        self.num_dims = int(num_dims)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(_accumulate(z))

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        probe = self._device_probe
        return torch.randn(n, self.num_dims, device=probe.device, dtype=probe.dtype) * temperature


@register("prior", "learned", description="i-ResNet's learned diagonal Gaussian: a mean and a log-std per "
                                          "dimension of z, both zero at the start")
class LearnedGaussianPrior(nn.Module):
    """``N(z; mean, diag(exp(log_std)^2))`` with trainable ``mean`` and ``log_std`` (zeros at the start)."""

    def __init__(self, num_dims: int):
        super().__init__()
        self.num_dims = int(num_dims)
        self.mean = nn.Parameter(torch.zeros(self.num_dims))
        self.log_std = nn.Parameter(torch.zeros(self.num_dims))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        z = _accumulate(z)
        mean, log_std = self.mean.to(z.dtype), self.log_std.to(z.dtype)
        t = (z - mean) * torch.exp(-log_std)
        return (-0.5 * t * t - log_std).sum(1) - self.num_dims * _HALF_LOG_2PI

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        with torch.no_grad():
            eps = torch.randn(n, self.num_dims, device=self.mean.device, dtype=self.mean.dtype)
            return self.mean + temperature * torch.exp(self.log_std) * eps


def build_prior(spec: Factory | nn.Module | None, num_dims: int) -> nn.Module:
    """The flow's prior over ``num_dims`` latent dimensions: ``None`` is the standard normal, a
    :class:`~iresflow.registry.Factory` (``registry.factory("prior", "learned")``) is built for
    ``num_dims``, a built prior is used as it is (it must have ``num_dims`` dimensions)."""
    if spec is None:
        return StandardNormalPrior(num_dims)
    if isinstance(spec, Factory):
        prior = spec(num_dims=num_dims)
    elif isinstance(spec, nn.Module):
        prior = spec
    else:
        raise TypeError(f"prior must be a registry.factory('prior', ...) or a built prior module, got {spec!r}")
    if getattr(prior, "num_dims", num_dims) != num_dims:
        raise ValueError(f"the prior has {prior.num_dims} dimensions, the flow's latent {num_dims}")
    for method in ("log_prob", "sample"):
        if not callable(getattr(prior, method, None)):
            raise TypeError(f"prior {type(prior).__name__} has no {method}() method")
    return prior
