"""Residual flows (kind ``model``, name ``iresnet_flow``): maximum likelihood and sampling.

``z = F(x)`` is a stack of invertible residual blocks (with ActNorm), and
``log p(x) = log N(z; 0, I) + sum of the layers' log|det|``.

- Vectors ``in_shape = (D,)``: ``n_blocks`` x [block with an MLP ``g``, ActNorm].
- Images ``in_shape = (C, H, W)``: a logit transform, then ``n_scales`` scales of
  ``n_blocks`` x [ActNorm, block with a conv ``g``]; between scales a squeeze
  (C, H, W) -> (4C, H/2, W/2) and half of the channels factored out to the
  prior (the multi-scale architecture of RealNVP, used by i-ResNet and
  Residual Flows), so deeper scales work on fewer, coarser dimensions.

Sampling draws ``z`` from the (tempered) prior and inverts every layer, the
residual blocks by their fixed-point solver.

``normalization: none`` (the unconstrained "Vanilla" ResNet) trains only with
the exact log-det: the power series of a series estimator converges only when
``Lip(g) < 1``, so that combination is refused when the model is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from iresflow.config import ConfigError
from iresflow.nn.activations import compile_activations
from iresflow.nn.block import InvertibleResidualBlock
from iresflow.nn.layers import ActNorm, LogitTransform, Split, Squeeze
from iresflow.nn.logdet import ExactLogDet
from iresflow.nn.normalization import resolve_normalization
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.registry import instance, register

__all__ = ["ResidualFlow", "standard_normal_log_prob"]


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample, summed over every non-batch dimension."""
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _fresh(spec: Any) -> Any:
    """One block's own component (``None``: the block's default)."""
    return None if spec is None else instance(spec)


def _is_exact(estimator: Any) -> bool:
    """Whether a log-det estimator computes the exact log-det (``exact = True``, or ExactLogDet)."""
    return bool(getattr(estimator, "exact", isinstance(estimator, ExactLogDet)))


def check_estimator_fits(normalization: Any, estimator: Any) -> None:
    """Refuse a series log-det estimator for an unconstrained ``g``: a :class:`ConfigError` (a
    ``ValueError`` the command line reports as one line, exit code 2) naming the remedy."""
    if normalization.constrains or (estimator is not None and _is_exact(instance(estimator))):
        return
    raise ConfigError("model.normalization does not constrain Lip(g) (vanilla ResNet): the log-det power "
                     "series does not converge without Lip(g) < 1; use model.estimator=exact "
                     "(or a constraining normalization such as operator)")


class _Scale(nn.Module):
    """The layers of one scale, applied in order (ActNorm and residual blocks)."""

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


@register("model", "iresnet_flow",
          description="residual flow: fc blocks for vectors, multi-scale conv blocks for images; "
                      "log_prob, inverse, sample")
class ResidualFlow(nn.Module):
    """A residual flow for inputs of shape ``in_shape``.

    Args:
        in_shape: per-sample shape, ``(D,)`` or ``(C, H, W)`` (filled in from the data).
        n_blocks: residual blocks (per scale for images).
        hidden: hidden widths of the MLP ``g`` (a list, or one int used twice), or
            the hidden channels of the conv ``g`` (an int).
        activation: the activation of ``g`` (a factory or module; default LipSwish).
        coeff: Lipschitz bound c of every normalised map of ``g``.
        actnorm: an ActNorm with each block.
        estimator, solver: log-det estimator and inverse solver (factories or
            objects; defaults Russian roulette and fixed point); each block gets its own instance.
        n_scales, kernel_sizes: images only; scales and the conv ``g``'s kernels.
        logit_alpha: images only; the logit transform's alpha (``None``: none).
        n_iterations: power iterations per training forward in each normalised map.
        preact: ``g`` starts with an activation.
        normalization: how ``g`` makes its linear maps (a factory or a built
            normalisation; default ``operator``). ``none`` needs ``estimator: exact``.
        compile: run the log-det estimators' activation pieces through ``torch.compile``
            (:func:`iresflow.nn.activations.compile_activations`; the first steps compile).
    """

    def __init__(self, in_shape: Sequence[int], n_blocks: int = 10, hidden: Any = (128, 128),
                 activation: Any = None, coeff: float = 0.97, actnorm: bool = True,
                 estimator: Any = None, solver: Any = None, n_scales: int = 3,
                 kernel_sizes: Sequence[int] = (3, 1, 3), logit_alpha: float | None = 0.05,
                 n_iterations: int = 1, preact: bool = True, normalization: Any = None,
                 compile: bool = False):
        super().__init__()
        normalization = resolve_normalization(normalization, n_iterations=n_iterations)
        check_estimator_fits(normalization, estimator)
        self.in_shape = tuple(int(s) for s in in_shape)
        if not self.in_shape:
            raise ValueError("iresnet_flow needs in_shape (the per-sample data shape)")
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.is_image = len(self.in_shape) == 3
        if len(self.in_shape) not in (1, 3):
            raise ValueError(f"in_shape must be (D,) or (C, H, W), got {self.in_shape}")

        def block(g: nn.Module) -> InvertibleResidualBlock:
            return InvertibleResidualBlock(g, solver=_fresh(solver), estimator=_fresh(estimator))

        common = dict(activation=activation, coeff=coeff, n_iterations=n_iterations, preact=preact,
                      normalization=normalization)
        self.logit = None
        self.squeeze, self.split = Squeeze(2), Split()
        scales: list[_Scale] = []
        # Shapes of the latent pieces, in the order they are concatenated into z.
        self._z_shapes: list[tuple[int, ...]] = []
        if not self.is_image:
            (dim,) = self.in_shape
            widths = [hidden, hidden] if isinstance(hidden, int) else list(hidden)
            layers: list[nn.Module] = []
            for _ in range(n_blocks):
                layers.append(block(MLPResidual(dim, hidden=widths, **common)))
                if actnorm:
                    layers.append(ActNorm(dim))
            scales.append(_Scale(layers))
            self._z_shapes.append(self.in_shape)
        else:
            c, h, w = self.in_shape
            if n_scales < 1:
                raise ValueError(f"n_scales must be >= 1, got {n_scales}")
            if h % 2 ** (n_scales - 1) or w % 2 ** (n_scales - 1):
                raise ValueError(f"{n_scales} scales halve the image {n_scales - 1} times; "
                                 f"{h}x{w} is not divisible by {2 ** (n_scales - 1)}")
            if not isinstance(hidden, int):
                raise ValueError(f"for images `hidden` is the conv g's hidden channels (an int), got {hidden!r}")
            self.logit = LogitTransform(logit_alpha) if logit_alpha is not None else None
            for s in range(n_scales):
                if s > 0:  # squeeze, then factor half of the channels out
                    c, h, w = 4 * c, h // 2, w // 2
                    self._z_shapes.append((c - c // 2, h, w))
                    c = c // 2
                layers = []
                for _ in range(n_blocks):
                    if actnorm:
                        layers.append(ActNorm(c))
                    layers.append(block(ConvResidual(c, input_size=(h, w), hidden_channels=hidden,
                                                     kernel_sizes=kernel_sizes, **common)))
                scales.append(_Scale(layers))
            self._z_shapes.append((c, h, w))
        self.scales = nn.ModuleList(scales)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)
        if compile:
            compile_activations(self)

    # -- properties ------------------------------------------------------------
    @property
    def blocks(self) -> list[InvertibleResidualBlock]:
        return [m for m in self.modules() if isinstance(m, InvertibleResidualBlock)]

    @property
    def num_dims(self) -> int:
        return math.prod(self.in_shape)

    # -- the flow --------------------------------------------------------------
    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z [B, D], log|det dz/dx| [B])``; ``z`` concatenates the factored-out pieces."""
        logdet = x.new_zeros(x.shape[0])
        if self.logit is not None:
            x, ld = self.logit.forward_and_logdet(x)
            logdet = logdet + ld
        pieces = []
        for s, scale in enumerate(self.scales):
            if s > 0:
                x, out = self.split.split(self.squeeze(x))
                pieces.append(out.flatten(1))
            x, ld = scale.forward_and_logdet(x)
            logdet = logdet + ld
        pieces.append(x.flatten(1))
        return torch.cat(pieces, 1), logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample (nats)."""
        return self.log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample, in nats, every layer's log-det included (logit too)."""
        z, logdet = self.forward_and_logdet(x)
        # The prior and the sum in (at least) float32, also under mixed precision.
        acc = torch.promote_types(z.dtype, torch.float32)
        return standard_normal_log_prob(z.to(acc)) + logdet.to(acc)

    @torch.no_grad()
    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``x = F^{-1}(z)`` for ``z [B, D]`` laid out as ``forward_and_logdet`` returns it."""
        sizes = [math.prod(s) for s in self._z_shapes]
        pieces = [p.reshape(-1, *shape) for p, shape in zip(z.split(sizes, 1), self._z_shapes)]
        x = pieces[-1]
        for s in range(len(self.scales) - 1, -1, -1):
            x = self.scales[s].inverse(x)
            if s > 0:
                x = self.squeeze.inverse(self.split.merge(x, pieces[s - 1]))
        if self.logit is not None:
            x = self.logit.inverse(x)
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples: ``z ~ N(0, temperature^2 I)`` through the inverse."""
        probe = self._device_probe
        z = torch.randn(n, self.num_dims, device=probe.device, dtype=probe.dtype) * temperature
        return self.inverse(z)
