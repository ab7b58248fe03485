"""The i-ResNet classifier (kind ``model``, name ``iresnet_classifier``).

Behrmann et al. (2019), Sec. 5: an injective zero-padding of the input
channels, stages of invertible residual blocks with the 3-1-3 conv bottleneck
``g``, a squeeze (space-to-depth, itself invertible) instead of a strided
downsampling between stages, then BatchNorm, ReLU, global average pooling and
a linear head. Everything before the head is invertible, so the features keep
all the information of the input (and ``features_inverse`` recovers it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from iresflow.nn.block import ContractionBlock, InvertibleResidualBlock
from iresflow.nn.layers import ActNorm, InjectivePad, Squeeze
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.nn.activations import ELU
from iresflow.nn.logdet import PowerSeriesLogDet
from iresflow.nn.normalization import resolve_normalization
from iresflow.registry import instance, register

__all__ = ["IResNetClassifier"]


@register("model", "iresnet_classifier",
          description="i-ResNet classifier: injective padding, stages of invertible blocks with squeezes, "
                      "linear head")
class IResNetClassifier(nn.Module):
    """Args:
        in_shape: ``(C, H, W)`` images (or ``(D,)`` vectors: MLP blocks, no squeezes).
        num_classes: outputs of the head (filled in from the data).
        stages: ``[[n_blocks, hidden], ...]``: blocks and hidden channels per stage;
            every stage after the first starts with a squeeze.
        coeff, activation, n_iterations, kernel_sizes: the residual functions' settings
            (activation: a factory or module, default ELU).
        init_pad: zero channels appended to the input (injective padding).
        actnorm: an ActNorm before every block.
        solver: inverse solver, a factory or object (default fixed point); used by
            ``features_inverse`` and the inverse check.
        normalization: how the residual functions make their linear maps (a factory or a
            built normalisation; default ``operator``; ``none``: the paper's Vanilla ResNet,
            whose ``features_inverse`` is not guaranteed and reports its solves).
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int = 10,
                 stages: Sequence[Sequence[int]] = ((7, 32), (7, 64), (7, 128)), coeff: float = 0.9,
                 activation: Any = None, n_iterations: int = 1, kernel_sizes: Sequence[int] = (3, 1, 3),
                 init_pad: int = 0, actnorm: bool = False, solver: Any = None, normalization: Any = None):
        super().__init__()
        normalization = resolve_normalization(normalization, n_iterations=n_iterations)
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) not in (1, 3):
            raise ValueError(f"in_shape must be (C, H, W) or (D,), got {in_shape}")
        if not stages:
            raise ValueError("stages must list at least one [n_blocks, hidden] pair")
        self.in_shape, self.num_classes = in_shape, int(num_classes)
        image = len(in_shape) == 3
        c = in_shape[0] + int(init_pad)
        h, w = in_shape[1:] if image else (1, 1)
        layers: list[nn.Module] = [InjectivePad(int(init_pad))] if init_pad else []
        for i, (n_blocks, hidden) in enumerate(stages):
            if i > 0 and image:
                if h % 2 or w % 2:
                    raise ValueError(f"stage {i} squeezes {h}x{w} features, which needs even sizes")
                layers.append(Squeeze(2))
                c, h, w = 4 * c, h // 2, w // 2
            for _ in range(int(n_blocks)):
                if actnorm:
                    layers.append(ActNorm(c))
                if image:
                    g = ConvResidual(c, input_size=(h, w), hidden_channels=int(hidden), kernel_sizes=kernel_sizes,
                                     activation=activation, coeff=coeff, n_iterations=n_iterations,
                                     normalization=normalization)
                else:
                    g = MLPResidual(c, hidden=(int(hidden), int(hidden)), activation=activation or ELU(), coeff=coeff,
                                    n_iterations=n_iterations, preact=True, normalization=normalization)
                layers.append(InvertibleResidualBlock(g, solver=None if solver is None else instance(solver),
                                                      estimator=PowerSeriesLogDet()))
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c, h, w) if image else (c,)
        norm = nn.BatchNorm2d(c) if image else nn.BatchNorm1d(c)
        self.head = nn.Sequential(norm, nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1) if image else nn.Identity(),
                                  nn.Flatten(), nn.Linear(c, self.num_classes))

    @property
    def blocks(self) -> list[ContractionBlock]:
        return [m for m in self.features.modules() if isinstance(m, ContractionBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.features(x))

    @torch.no_grad()
    def features_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Invert the feature extractor: the input that produced features ``z``."""
        for layer in reversed(self.features):
            z = layer.inverse(z)
        return z
