"""Residual flows (kind ``model``, name ``iresnet_flow``): maximum likelihood and sampling.

``z = F(x)`` is a stack of contraction blocks (with ActNorm), and
``log p(x) = log p_Z(z) + sum of the layers' log|det|``.

- Vectors ``in_shape = (D,)``: ``n_blocks`` x [block with an MLP ``g``, ActNorm after it].
- Images ``in_shape = (C, H, W)``: a logit transform, then ``n_scales`` scales of
  ``n_blocks`` x [ActNorm, block with a conv ``g``]; between scales a squeeze
  (C, H, W) -> (4C, H/2, W/2) and (``factor_out``) half of the channels sent to the
  prior (the multi-scale architecture of RealNVP, used by i-ResNet), so deeper scales work
  on fewer, coarser dimensions.

Residual Flows' image recipe (Chen et al. 2019, ``train_img.py``) and its successors are
options, each a config key (``configs/experiment/resflow_*.yaml`` set the papers' values):

- ``factor_out: false`` keeps every dimension to the end (Residual Flows' CIFAR-10 model);
- ``squeeze_first``: a squeeze before the first scale (i-ResNet's ``init_ds 2``);
- ``fc_end``: ``n_fc_blocks`` fully connected blocks on the flattened last-scale features
  (``fc_hidden`` widths, or any vector residual function as ``fc_residual``);
- ``actnorm``: ``before`` / ``after`` each block, ``input_and_after`` / ``none`` (``true``: vectors after,
  images before, as before these options existed);
- ``prior``: kind ``prior``, ``standard`` or ``learned`` (:mod:`iresflow.models.priors`) or a plugin's;
- ``padding`` channels of noise from ``padding_distribution`` (:mod:`iresflow.models.padding`;
  appended after the logit transform): ``log_prob`` is then ``log p(x, e) - log q(e)``, an
  unbiased estimate of a lower bound of ``log p(x)``;
- ``block``: the block kind (``residual``, ``implicit``, a plugin), one node for every scale
  or a list with one per scale (the fully connected blocks take the last scale's);
- ``residual``: the residual function (``conv`` / ``dense_conv`` for images, ``mlp`` /
  ``dense_mlp`` for vectors).

Sampling draws ``z`` from the (tempered) prior and inverts every layer, the blocks by
their solvers. ``normalization: none`` (the unconstrained "Vanilla" ResNet) trains only
with the exact log-det: the power series of a series estimator converges only when
``Lip(g) < 1``, so that combination is refused when the model is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from iresflow.config import ConfigError
from iresflow.models.multiscale import BlockMaker, Stage, actnorm_place
from iresflow.models.padding import NoisePadding
from iresflow.models.priors import build_prior, standard_normal_log_prob
from iresflow.nn.activations import compile_activations
from iresflow.nn.block import ContractionBlock
from iresflow.nn.layers import LogitTransform, Split, Squeeze
from iresflow.nn.logdet import ExactLogDet
from iresflow.nn.normalization import resolve_normalization
from iresflow.registry import instance, register

__all__ = ["ResidualFlow", "FlowPass", "standard_normal_log_prob", "check_estimator_fits"]


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


@dataclass
class FlowPass:
    """One pass of the flow: the latent ``z [B, D_z]``, the log-det of the map to it ``[B]``,
    ``log q(e) [B]`` of the padding noise (None without padding) and ``features``: per scale
    the tensor Residual Flows' hybrid heads read (the factored-out piece, or with
    ``factor_out: false`` the squeezed features), the last scale's output last."""

    z: torch.Tensor
    logdet: torch.Tensor
    noise_log_prob: torch.Tensor | None
    features: list[torch.Tensor]


def _widths(hidden: Any) -> list[int]:
    return [hidden, hidden] if isinstance(hidden, int) else [int(h) for h in hidden]


@register("model", "iresnet_flow",
          description="residual flow: fc blocks for vectors, multi-scale conv blocks for images (Residual "
                      "Flows' recipe as options: fc_end, factor_out, priors, padding, block kinds); "
                      "log_prob, inverse, sample")
class ResidualFlow(nn.Module):
    """A residual flow for inputs of shape ``in_shape``.

    Args:
        in_shape: per-sample shape, ``(D,)`` or ``(C, H, W)`` (filled in from the data).
        n_blocks: blocks (per scale for images).
        hidden: hidden widths of the MLP ``g`` (a list, or one int used twice), or
            the hidden channels of the conv ``g`` (an int).
        activation: the activation of ``g`` (a factory or module; default LipSwish).
        coeff: Lipschitz bound c of every normalised map of ``g``.
        actnorm: ``before`` / ``after`` each block, ``input_and_after`` (one more before the first
            block: Residual Flows' toy), ``none``; ``true``: vectors after, images before.
        estimator, solver: log-det estimator and inverse solver (factories or
            objects; defaults Russian roulette and the block's own); each block gets its own instance.
        n_scales, kernel_sizes: images only; scales and the conv ``g``'s kernels.
        logit_alpha: images only; the logit transform's alpha (``None``: none).
        n_iterations: power iterations per training forward in each normalised map.
        preact: ``g`` starts with an activation.
        normalization: how ``g`` makes its linear maps (a factory or a built
            normalisation; default ``operator``). ``none`` needs ``estimator: exact``.
        compile: run the log-det estimators' activation pieces through ``torch.compile``
            (:func:`iresflow.nn.activations.compile_activations`; the first steps compile).
        block: the block kind, a factory (``{name: residual}``, ``{name: implicit, ...}``) or a
            list with one per scale; ``None``: the residual block.
        residual: the residual function's factory (``None``: ``mlp`` for vectors, ``conv`` for images).
        fc_end, n_fc_blocks, fc_hidden, fc_residual: images only; fully connected blocks at the end.
        squeeze_first, factor_out: images only; see the module notes.
        prior: the prior's factory (kind ``prior``: ``standard``, ``learned``, a plugin's); ``None``:
            the standard normal.
        padding, padding_distribution: noise channels appended to the input (0: none).
    """

    def __init__(self, in_shape: Sequence[int], n_blocks: int = 10, hidden: Any = (128, 128),
                 activation: Any = None, coeff: float = 0.97, actnorm: Any = True,
                 estimator: Any = None, solver: Any = None, n_scales: int = 3,
                 kernel_sizes: Sequence[int] = (3, 1, 3), logit_alpha: float | None = 0.05,
                 n_iterations: int = 1, preact: bool = True, normalization: Any = None,
                 compile: bool = False, block: Any = None, residual: Any = None, fc_end: bool = False,
                 n_fc_blocks: int = 4, fc_hidden: Sequence[int] = (128, 128), fc_residual: Any = None,
                 squeeze_first: bool = False, factor_out: bool = True, prior: Any = None,
                 padding: int = 0, padding_distribution: str = "uniform"):
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
        if int(padding) < 0:
            raise ValueError(f"padding must be >= 0 (noise channels), got {padding}")
        if not self.is_image and (fc_end or squeeze_first):
            raise ValueError("fc_end and squeeze_first are options of image flows; a vector flow is fully "
                             "connected already")
        self.factor_out = bool(factor_out) and self.is_image
        self.squeeze_first = bool(squeeze_first)
        settings = dict(activation=activation, coeff=coeff, n_iterations=n_iterations, preact=preact,
                        normalization=normalization)
        n_stages = int(n_scales) if self.is_image else 1
        if n_stages < 1:
            raise ValueError(f"n_scales must be >= 1, got {n_scales}")
        maker = BlockMaker(block=block, n_stages=n_stages, residual=residual, fc_residual=fc_residual,
                           solver=solver, estimator=estimator, actnorm=actnorm_place(actnorm, self.is_image),
                           settings=settings)
        self.logit = None
        self.padding = NoisePadding(int(padding), padding_distribution) if padding else None
        self.squeeze, self.split = Squeeze(2), Split()
        scales: list[Stage] = []
        # Shapes of the latent pieces (in the order they are concatenated into z) and of the features.
        self._z_shapes: list[tuple[int, ...]] = []
        self.feature_shapes: list[tuple[int, ...]] = []
        if not self.is_image:
            dim = self.in_shape[0] + int(padding)
            scales.append(Stage(maker.vector_stage(0, n_blocks, dim, _widths(hidden))))
            self._z_shapes.append((dim,))
        else:
            if not isinstance(hidden, int):
                raise ValueError(f"for images `hidden` is the conv g's hidden channels (an int), got {hidden!r}")
            c, h, w = self.in_shape
            c += int(padding)
            self.logit = LogitTransform(logit_alpha) if logit_alpha is not None else None
            if self.squeeze_first:
                if h % 2 or w % 2:
                    raise ValueError(f"squeeze_first halves the image; {h}x{w} is not divisible by 2")
                c, h, w = 4 * c, h // 2, w // 2
            if h % 2 ** (n_stages - 1) or w % 2 ** (n_stages - 1):
                raise ValueError(f"{n_stages} scales halve the image {n_stages - 1} times; "
                                 f"{h}x{w} is not divisible by {2 ** (n_stages - 1)}")
            for s in range(n_stages):
                if s > 0:  # squeeze, then (factor_out) send half of the channels to the prior
                    c, h, w = 4 * c, h // 2, w // 2
                    if self.factor_out:
                        self._z_shapes.append((c - c // 2, h, w))
                        self.feature_shapes.append((c - c // 2, h, w))
                        c = c // 2
                    else:
                        self.feature_shapes.append((c, h, w))
                layers = maker.conv_stage(s, n_blocks, (c, h, w), hidden, kernel_sizes)
                if fc_end and s == n_stages - 1:
                    if int(n_fc_blocks) < 1:
                        raise ValueError(f"fc_end needs n_fc_blocks >= 1, got {n_fc_blocks}")
                    layers += maker.fc_stage(s, int(n_fc_blocks), (c, h, w), [int(x) for x in fc_hidden])
                scales.append(Stage(layers))
            self._z_shapes.append((c, h, w))
        self.feature_shapes.append(self._z_shapes[-1])
        self.scales = nn.ModuleList(scales)
        self.latent_dims = sum(math.prod(s) for s in self._z_shapes)
        self.prior = build_prior(prior, self.latent_dims)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)
        if compile:
            compile_activations(self)

    # -- properties ------------------------------------------------------------
    @property
    def blocks(self) -> list[ContractionBlock]:
        return [m for m in self.modules() if isinstance(m, ContractionBlock)]

    @property
    def num_dims(self) -> int:
        """Dimensions of the data (the padding's are not counted)."""
        return math.prod(self.in_shape)

    # -- the flow --------------------------------------------------------------
    def forward_pass(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> FlowPass:
        """The flow on ``x`` (with ``padding``: on ``x`` and the noise ``noise``, drawn when None)."""
        logdet = x.new_zeros(x.shape[0])
        if self.logit is not None:
            x, ld = self.logit.forward_and_logdet(x)
            logdet = logdet + ld
        noise_log_prob = None
        if self.padding is not None:
            noise = self.padding.draw(x) if noise is None else noise
            noise_log_prob = self.padding.log_q(noise)
            x = self.padding.pad(x, noise)
        elif noise is not None:
            raise ValueError("noise was given to a flow without padding")
        if self.squeeze_first:
            x = self.squeeze(x)
        pieces, features = [], []
        for s, scale in enumerate(self.scales):
            if s > 0:
                x = self.squeeze(x)
                if self.factor_out:
                    x, out = self.split.split(x)
                    pieces.append(out.flatten(1))
                    features.append(out)
                else:
                    features.append(x)
            x, ld = scale.forward_and_logdet(x)
            logdet = logdet + ld
        pieces.append(x.flatten(1))
        features.append(x)
        return FlowPass(torch.cat(pieces, 1), logdet, noise_log_prob, features)

    def forward_and_logdet(self, x: torch.Tensor, noise: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z [B, D_z], log|det dz/d(x, e)| [B])``; ``z`` concatenates the factored-out pieces."""
        out = self.forward_pass(x, noise)
        return out.z, out.logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample (nats)."""
        return self.log_prob(x)

    def log_prob_of(self, out: FlowPass) -> torch.Tensor:
        """``log p_Z(z) + log|det|`` (``- log q(e)`` with padding), in at least float32."""
        acc = torch.promote_types(out.z.dtype, torch.float32)
        logp = self.prior.log_prob(out.z) + out.logdet.to(acc)
        if out.noise_log_prob is not None:
            logp = logp - out.noise_log_prob.to(acc)
        return logp

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample, in nats, every layer's log-det included (logit too). With
        ``padding``: ``log p(x, e) - log q(e)`` for fresh noise ``e``, an unbiased estimate of a
        lower bound of ``log p(x)``."""
        return self.log_prob_of(self.forward_pass(x))

    def joint_log_prob(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``log p(x, e)`` of the augmented input, exact (a flow with ``padding`` only)."""
        if self.padding is None:
            raise ValueError("joint_log_prob needs a flow with padding (model.padding > 0)")
        out = self.forward_pass(x, noise)
        return self.prior.log_prob(out.z) + out.logdet.to(torch.promote_types(out.z.dtype, torch.float32))

    @torch.no_grad()
    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``x = F^{-1}(z)`` for ``z [B, D_z]`` laid out as ``forward_and_logdet`` returns it
        (the padding channels are dropped)."""
        sizes = [math.prod(s) for s in self._z_shapes]
        pieces = [p.reshape(-1, *shape) for p, shape in zip(z.split(sizes, 1), self._z_shapes)]
        x = pieces[-1]
        for s in range(len(self.scales) - 1, -1, -1):
            x = self.scales[s].inverse(x)
            if s > 0:
                if self.factor_out:
                    x = self.split.merge(x, pieces[s - 1])
                x = self.squeeze.inverse(x)
        if self.squeeze_first:
            x = self.squeeze.inverse(x)
        if self.padding is not None:
            x = self.padding.strip(x)
        if self.logit is not None:
            x = self.logit.inverse(x)
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples: ``z`` from the prior (its standard deviation times ``temperature``)
        through the inverse."""
        z = self.prior.sample(n, temperature).to(self._device_probe.dtype)
        return self.inverse(z)
