"""Example plugin: a logistic prior (kind ``prior``, name ``logistic``), NICE's base distribution.

Any ``*.py`` file in this folder is imported when iresflow starts, so the ``@register``
below makes ``model.prior=logistic`` (or ``model.prior='{name: logistic, scale: 2}'``)
usable from any config line. Copy this file to start your own prior.

Each latent dimension is an independent logistic variable of location 0 and scale ``s``:

    log p(z) = sum_i [ -z_i / s - 2 log(1 + exp(-z_i / s)) - log s ]
             = sum_i [ -softplus(z_i / s) - softplus(-z_i / s) - log s ]

(the second form is symmetric and stable for large |z|). Sampling inverts the CDF:
``z = s * (log u - log(1 - u))``, ``u ~ U(0, 1)``. Its tails are heavier than a Gaussian's
(exponential, not quadratic, in |z|), which penalises outliers less.

What a prior must provide (see ``iresflow/models/priors.py``): it is built with
``num_dims`` (the flow's latent size, flattened), has ``log_prob(z)`` (per sample, summed
over the dimensions) and ``sample(n, temperature)`` (``[n, num_dims]``).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.registry import register


@register("prior", "logistic", description="example plugin: independent logistic(0, scale) per latent "
                                           "dimension (NICE's prior), heavier tails than N(0, I)")
class LogisticPrior(nn.Module):
    def __init__(self, num_dims: int, scale: float = 1.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"the logistic prior's scale must be positive, got {scale}")
        self.num_dims = int(num_dims)
        self.scale = float(scale)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(z.shape[0], -1).to(torch.promote_types(z.dtype, torch.float32))
        t = z / self.scale
        return (-F.softplus(t) - F.softplus(-t)).sum(1) - self.num_dims * math.log(self.scale)

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        probe = self._device_probe
        u = torch.rand(n, self.num_dims, device=probe.device, dtype=probe.dtype).clamp(1e-7, 1 - 1e-7)
        return temperature * self.scale * (torch.log(u) - torch.log1p(-u))
