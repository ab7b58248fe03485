"""A residual function as a chain of layers whose Jacobian is a product of per-layer factors.

``g = f_L o ... o f_1`` where each ``f_i`` is a linear map (``nn.Linear``,
``nn.Conv2d``, subclasses included) or an elementwise activation; then::

    J = W_L D_{L-1} ... D_2 W_1,      D_i = diag(f_i'(x_i))

and ``w^T J`` is a few matrix products (transposed convolutions) and elementwise
scalings. The residual functions say when they are such a chain
(``g.linear_chain()``); this module describes the chain for an input: one
:class:`ChainLayer` per layer, of one of the :class:`LayerKind` kinds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import nn

from iresflow.nn.activations import ElementwiseActivation
from iresflow.nn.conv_ops import ConvStrategy, conv_output_size, conv_strategy, output_padding

__all__ = ["LayerKind", "ChainLayer", "chain_of", "is_fusable", "linear_weight"]


class LayerKind(enum.Enum):
    LINEAR = "linear"
    CONV = "conv"
    ACTIVATION = "activation"


@dataclass(frozen=True)
class ChainLayer:
    """One layer of the chain for a given input shape. ``strategy`` and ``out_padding`` are for
    convolutions only:
    how the map is computed (:mod:`iresflow.nn.conv_ops`) and the ``output_padding`` that
    makes the adjoint restore the layer's input size."""

    kind: LayerKind
    module: nn.Module
    in_shape: tuple[int, ...]  # the per-sample shape of its input
    strategy: ConvStrategy | None = None
    out_padding: tuple[int, int] = (0, 0)

    is_map: bool = field(init=False)  # a linear map (not an activation)

    def __post_init__(self):
        object.__setattr__(self, "is_map", self.kind is not LayerKind.ACTIVATION)


def linear_weight(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The weight the layer applies to ``x``: ``m.weight_for(x)`` when the layer has it (a
    normalised layer: this also runs its training-time power iterations), else ``m.weight``."""
    return m.weight_for(x) if hasattr(m, "weight_for") else m.weight


def _describe(layers: list[nn.Module], sample_shape: tuple[int, ...]) -> list[ChainLayer] | None:
    out = []
    shape = sample_shape
    for m in layers:
        if isinstance(m, nn.Linear):
            if len(shape) != 1:
                return None
            out.append(ChainLayer(LayerKind.LINEAR, m, shape))
            shape = (m.out_features,)
        elif isinstance(m, nn.Conv2d):
            if len(shape) != 3:
                return None
            size = shape[1:]
            out_size = conv_output_size(m, size)
            out.append(ChainLayer(LayerKind.CONV, m, shape, conv_strategy(m), output_padding(m, size, out_size)))
            shape = (m.out_channels, *out_size)
        else:
            out.append(ChainLayer(LayerKind.ACTIVATION, m, shape))
            shape = (shape[0] * getattr(m, "width_factor", 1), *shape[1:])
    return out


def chain_of(g: nn.Module, x: torch.Tensor) -> list[ChainLayer] | None:
    """The chain of ``g`` for inputs shaped like ``x``; ``None`` when ``g`` is not a chain."""
    method = getattr(g, "linear_chain", None)
    layers = method() if callable(method) else None
    if not layers:
        return None
    key = (tuple(map(id, layers)), tuple(x.shape[1:]))
    cached = g.__dict__.get("_logdet_chain")
    if cached is None or cached[0] != key:
        cached = (key, _describe(layers, tuple(x.shape[1:])))
        g.__dict__["_logdet_chain"] = cached
    return cached[1]


def is_fusable(chain: list[ChainLayer]) -> bool:
    """Every activation is defined by its formulas (:class:`ElementwiseActivation`): the fused
    memory-efficient path (:mod:`iresflow.nn.logdet.fused`) can evaluate and differentiate it."""
    return all(layer.is_map or isinstance(layer.module, ElementwiseActivation) for layer in chain)
