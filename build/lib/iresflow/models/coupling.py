"""A Glow-style coupling flow (kind ``model``, name ``glow``): the i-ResNet paper's baseline.

Kingma & Dhariwal (2018). One *step* is ActNorm, an invertible 1x1 convolution
(``W = P L (U + diag(sign * exp(log_s)))``, LU-parametrised, so
``log|det W| = sum(log_s)`` per position) and an affine coupling layer: the
input's channels are split into a conditioning half ``a`` and a transformed
half ``b``, and

    ``(shift, raw) = NN(a)``,  ``log_s = bound * tanh(raw / bound)``,
    ``b' = b * exp(log_s) + shift``,  ``log|det| = sum(log_s)``.

The tanh keeps every scale in ``[e^-bound, e^bound]`` (a stable scale), and the
network's last layer starts at zero, so every step starts as the identity.
Everything is exact: the log-det is a sum, the inverse is closed form.

- Vectors ``in_shape = (D,)``: ``n_steps`` steps on ``D`` features (MLP
  networks); the halves alternate from one coupling to the next, and the
  invertible linear map mixes the features in between.
- Images ``(C, H, W)``: a logit transform, then ``n_scales`` levels of
  [squeeze, ``n_steps`` steps (conv networks 3x3 -> 1x1 -> 3x3)], with half of
  the channels factored out to the prior after every level but the last
  (Glow's multi-scale architecture).

The interface is the residual flow's (``log_prob``, ``forward_and_logdet``,
``inverse``, ``sample``, ``blocks`` -- empty: there is no residual block), so the
density task, its configs and the sweeps run it unchanged.
:func:`hidden_for_parameter_count` picks the width that matches another
model's parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.models.flow import standard_normal_log_prob
from iresflow.nn.layers import ActNorm, LogitTransform, Split, Squeeze
from iresflow.registry import register

__all__ = ["InvertibleLinear", "AffineCoupling", "GlowFlow", "hidden_for_parameter_count", "parameter_count"]


def _mix(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` applied along the channel dimension of ``[B, C]`` or ``[B, C, H, W]``."""
    if x.dim() == 2:
        return x @ weight.t()
    return F.conv2d(x, weight.view(*weight.shape, 1, 1))


class InvertibleLinear(nn.Module):
    """Glow's invertible 1x1 convolution (for vectors: an invertible linear map), LU-parametrised.

    ``W = P L (U + diag(sign * exp(log_s)))`` with ``P`` a fixed permutation, ``L``
    unit lower triangular and ``U`` strictly upper triangular, initialised from a
    random rotation. ``log|det J| = sum(log_s) * H * W``.
    """

    def __init__(self, channels: int):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        perm, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", perm)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diag.abs()))

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = math.prod(x.shape[2:])
        logdet = (self.log_s.sum() * positions).to(x.dtype).expand(x.shape[0])
        return _mix(self.weight(), x), logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return _mix(torch.linalg.inv(self.weight()), y)


def _coupling_net(in_channels: int, out_channels: int, hidden: int, image: bool) -> nn.Sequential:
    """``a -> (shift, raw)``: MLP (vectors) or conv 3x3 -> 1x1 -> 3x3 (images); the last layer is zero."""
    if image:
        layers = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                  nn.Conv2d(hidden, 2 * out_channels, 3, padding=1)]
    else:
        layers = [nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                  nn.Linear(hidden, 2 * out_channels)]
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class AffineCoupling(nn.Module):
    """``b' = b * exp(log_s(a)) + shift(a)`` with ``log_s = bound * tanh(raw / bound)``.

    ``a`` is the first ``channels // 2`` channels and ``b`` the rest, or the other
    way round with ``flip``.
    """

    def __init__(self, channels: int, hidden: int, image: bool, flip: bool = False, scale_bound: float = 2.0):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer splits the channels in two; got {channels} channel(s)")
        self.flip, self.scale_bound = bool(flip), float(scale_bound)
        first = channels // 2
        self.sizes = (first, channels - first) if not flip else (channels - first, first)
        self.net = _coupling_net(self.sizes[0], self.sizes[1], hidden, image)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flip:
            b, a = x.split(self.sizes[::-1], 1)
        else:
            a, b = x.split(self.sizes, 1)
        return a, b

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([b, a] if self.flip else [a, b], 1)

    def _scale_shift(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(a).chunk(2, 1)
        return self.scale_bound * torch.tanh(raw / self.scale_bound), shift

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._halves(x)
        log_s, shift = self._scale_shift(a)
        return self._join(a, b * torch.exp(log_s) + shift), log_s.flatten(1).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = self._halves(y)
        log_s, shift = self._scale_shift(a)
        return self._join(a, (b - shift) * torch.exp(-log_s))


class _Steps(nn.Module):
    """Flow layers applied in order; log-dets summed."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward_and_logdet(self, x):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer.forward_and_logdet(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


@register("model", "glow", description="Glow-style coupling flow (ActNorm, invertible 1x1 conv, affine coupling; "
                                       "multi-scale for images): exact log-det, the i-ResNet paper's baseline")
class GlowFlow(nn.Module):
    """A Glow coupling flow for inputs of shape ``in_shape``.

    Args:
        in_shape: ``(D,)`` or ``(C, H, W)`` (filled in from the data).
        n_steps: flow steps (per level for images).
        hidden: width (vectors) or channels (images) of the coupling networks: the
            knob for matching a parameter count (:func:`hidden_for_parameter_count`).
        n_scales: images only; levels (each starts with a squeeze, so H and W must be
            divisible by ``2 ** n_scales``).
        scale_bound: the coupling scales lie in ``[exp(-bound), exp(bound)]``.
        actnorm, invertible_linear: ActNorm / the 1x1 convolution in every step
            (without it the halves still alternate).
        logit_alpha: images only; the logit transform's alpha (``None``: none).
    """

    def __init__(self, in_shape: Sequence[int], n_steps: int = 10, hidden: int = 64, n_scales: int = 3,
                 scale_bound: float = 2.0, actnorm: bool = True, invertible_linear: bool = True,
                 logit_alpha: float | None = 0.05):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        if len(self.in_shape) not in (1, 3):
            raise ValueError(f"in_shape must be (D,) or (C, H, W), got {self.in_shape}")
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.is_image = len(self.in_shape) == 3

        def steps(channels: int) -> _Steps:
            layers: list[nn.Module] = []
            for i in range(int(n_steps)):
                if actnorm:
                    layers.append(ActNorm(channels))
                if invertible_linear:
                    layers.append(InvertibleLinear(channels))
                layers.append(AffineCoupling(channels, int(hidden), self.is_image, flip=i % 2 == 1,
                                             scale_bound=scale_bound))
            return _Steps(layers)

        self.logit = None
        self.squeeze, self.split = Squeeze(2), Split()
        self._z_shapes: list[tuple[int, ...]] = []  # the latent pieces, in the order of z
        levels: list[_Steps] = []
        if not self.is_image:
            levels.append(steps(self.in_shape[0]))
            self._z_shapes.append(self.in_shape)
        else:
            c, h, w = self.in_shape
            if n_scales < 1:
                raise ValueError(f"n_scales must be >= 1, got {n_scales}")
            if h % 2 ** n_scales or w % 2 ** n_scales:
                raise ValueError(f"{n_scales} levels squeeze the image {n_scales} times; {h}x{w} is not "
                                 f"divisible by {2 ** n_scales}")
            self.logit = LogitTransform(logit_alpha) if logit_alpha is not None else None
            for s in range(int(n_scales)):
                c, h, w = 4 * c, h // 2, w // 2
                levels.append(steps(c))
                if s < n_scales - 1:  # factor half of the channels out
                    self._z_shapes.append((c - c // 2, h, w))
                    c = c // 2
            self._z_shapes.append((c, h, w))
        self.levels = nn.ModuleList(levels)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    @property
    def blocks(self) -> list[nn.Module]:
        """No invertible residual blocks (nothing to solve or estimate)."""
        return []

    @property
    def num_dims(self) -> int:
        return math.prod(self.in_shape)

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z [B, D], log|det dz/dx| [B])``; ``z`` concatenates the factored-out pieces."""
        logdet = x.new_zeros(x.shape[0])
        if self.logit is not None:
            x, ld = self.logit.forward_and_logdet(x)
            logdet = logdet + ld
        pieces = []
        for s, level in enumerate(self.levels):
            if self.is_image:
                x = self.squeeze(x)
            x, ld = level.forward_and_logdet(x)
            logdet = logdet + ld
            if self.is_image and s < len(self.levels) - 1:
                x, out = self.split.split(x)
                pieces.append(out.flatten(1))
        pieces.append(x.flatten(1))
        return torch.cat(pieces, 1), logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample (nats)."""
        return self.log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample, in nats, every layer's log-det included (logit too)."""
        z, logdet = self.forward_and_logdet(x)
        acc = torch.promote_types(z.dtype, torch.float32)
        return standard_normal_log_prob(z.to(acc)) + logdet.to(acc)

    @torch.no_grad()
    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``x = F^{-1}(z)`` for ``z [B, D]`` laid out as ``forward_and_logdet`` returns it."""
        sizes = [math.prod(s) for s in self._z_shapes]
        pieces = [p.reshape(-1, *shape) for p, shape in zip(z.split(sizes, 1), self._z_shapes)]
        x = pieces[-1]
        for s in range(len(self.levels) - 1, -1, -1):
            if self.is_image and s < len(self.levels) - 1:
                x = self.split.merge(x, pieces[s])
            x = self.levels[s].inverse(x)
            if self.is_image:
                x = self.squeeze.inverse(x)
        if self.logit is not None:
            x = self.logit.inverse(x)
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples: ``z ~ N(0, temperature^2 I)`` through the inverse."""
        probe = self._device_probe
        z = torch.randn(n, self.num_dims, device=probe.device, dtype=probe.dtype) * temperature
        return self.inverse(z)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def hidden_for_parameter_count(target: int, in_shape: Sequence[int], **glow: Any) -> int:
    """The ``hidden`` width whose :class:`GlowFlow` (with the other settings ``glow``) has the
    parameter count closest to ``target`` (e.g. an i-ResNet's, for a comparison at equal size).
    The count grows with ``hidden``, so a bisection finds it."""

    def count(hidden: int) -> int:
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            return parameter_count(GlowFlow(in_shape, hidden=hidden, **glow))

    lo, hi = 1, 2
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda h: abs(count(h) - target))
