"""Residual functions ``g`` of ``F(x) = x + g(x)`` (kind ``residual``), with ``Lip(g) < 1``.

``g`` alternates normalised linear maps and activations. Every linear map is
made by the ``normalization`` (kind ``normalization``, default ``operator``:
:mod:`iresflow.nn.normalization`) with the bound ``coeff`` divided by the
Lipschitz constant of the activation before it, so
``Lip(g) <= coeff ** n_linear <= coeff`` (the i-ResNet convention: ``c`` is the
per-layer bound). ``lipschitz_bound()`` returns the product of the layers'
current operator norms and the activations' constants: the bound that the
estimator and the inverse rely on (with ``normalization: none`` the estimated
product of the real, unconstrained norms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torch.nn.modules import module as _module

from iresflow.nn.activations import ELU, LipSwish
from iresflow.nn.normalization import Normalization, resolve_normalization
from iresflow.registry import instance, register

__all__ = ["MLPResidual", "ConvResidual", "ResidualFunction"]


class ResidualFunction(nn.Module):
    """A sequence of normalised linear maps and activations with a certified bound."""

    net: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def linear_chain(self) -> list[nn.Module] | None:
        """The layers of ``g`` when its Jacobian is a product of per-layer factors that
        the log-det estimators can apply directly; ``None`` otherwise.

        That holds when ``g`` is the plain chain ``net`` of linear maps (``nn.Linear``,
        ``nn.Conv2d`` with zero padding and one group; spectrally normalised or not)
        and elementwise activations (``elementwise = True``, with
        ``forward_and_derivative``), with no forward hooks that a direct evaluation
        would bypass. The estimators then form ``J^T w`` from the weights and the
        activations' derivatives instead of autograd's generic (double) backward;
        the value and the gradients are the same.
        """
        if type(self).forward is not ResidualFunction.forward:
            return None
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        layers = list(self.net)
        for m in (self, self.net, *layers):
            if m._forward_hooks or m._forward_pre_hooks:
                return None
        # The structure only changes if ``net`` is edited: check it once per layer list.
        key = tuple(map(id, layers))
        cached = self.__dict__.get("_linear_chain_key")
        if cached != key:
            self.__dict__["_linear_chain_ok"] = all(_is_chain_layer(m) for m in layers)
            self.__dict__["_linear_chain_key"] = key
        return layers if self.__dict__["_linear_chain_ok"] else None

    def lipschitz_bound(self) -> float:
        """Product of the linear maps' ``lipschitz_constant()`` and the activations' ``lipschitz``."""
        bound = 1.0
        for m in self.net:
            if hasattr(m, "lipschitz_constant"):
                bound *= m.lipschitz_constant()
            else:
                bound *= float(getattr(m, "lipschitz", 1.0))
        return bound


def _is_chain_layer(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return bool(getattr(m, "elementwise", False)) and hasattr(m, "forward_and_derivative")


def _normalization(spec: Any, coeff: float, **settings: Any) -> Normalization:
    """The residual function's normalisation (``settings`` fill what a factory's node leaves
    unset); a constraining one needs ``0 < coeff < 1`` for ``g`` to be a contraction."""
    norm = resolve_normalization(spec, **settings)
    if norm.constrains and not 0 < coeff < 1:
        raise ValueError(f"coeff must lie in (0, 1) for g to be a contraction, got {coeff}")
    return norm


@torch.no_grad()
def _scale_last_map(net: nn.Sequential, scale: float) -> None:
    """``W_L <- s W_L``, ``b_L <- s b_L`` on the last linear map of ``net`` (near-identity init).

    A map that tracks its norm by power iteration keeps its vectors and scales its estimate,
    ``sigma(s W_L) = s sigma(W_L)``. ``s = 0`` would leave power iteration nothing to iterate
    on (``W^T u = 0`` zeroes the vectors, and a zero estimate leaves the map unconstrained once
    it trains), so such a map needs ``s > 0``; a tiny one such as 1e-3 serves the same purpose.
    """
    scale = float(scale)
    if scale == 1.0:
        return
    last = next((m for m in reversed(net) if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if last is None:
        return
    power_iteration = getattr(last, "power_iteration", None)
    if not 0.0 <= scale <= 1.0 or (scale == 0.0 and power_iteration is not None):
        raise ValueError(f"last_init_scale must lie in (0, 1] (power iteration cannot start from a zero "
                         f"matrix), got {scale}; Residual Flows' zero_init is 1e-3")
    last.weight.mul_(scale)
    if last.bias is not None:
        last.bias.mul_(scale)
    sigma = getattr(last, "sigma", None)
    if isinstance(sigma, torch.Tensor):
        sigma.mul_(scale)


def _activation(spec: Any, default: type[nn.Module]) -> nn.Module:
    """A fresh activation from a factory (or a copy of a built one); ``None``: ``default()``."""
    act = default() if spec is None else instance(spec)
    if not hasattr(act, "lipschitz"):
        raise TypeError(f"activation {type(act).__name__} must declare its Lipschitz constant "
                        "(a `lipschitz` attribute)")
    return act


@register("residual", "mlp", description="fully connected g: dim -> hidden... -> dim, linear maps by the "
                                         "normalization (toy 2D and vector flows)")
class MLPResidual(ResidualFunction):
    """``g = W_L o act o ... o act o W_1`` (with ``preact``: an activation first).

    Args:
        dim: input and output width.
        hidden: widths of the hidden layers.
        activation: an activation module (copied for every position) or a factory
            of one; a config node ``{name: lipswish, beta: 1.0}`` through the registry.
        coeff: bound c on each normalised linear map (ignored by ``normalization: none``).
        n_iterations, tol, max_iterations: power-iteration settings of each layer (defaults
            for the normalisation's node).
        preact: start with an activation (as stacked Residual Flows blocks do).
        normalization: how the linear maps are made: a factory or a built
            :class:`~iresflow.nn.normalization.Normalization` (default ``operator``).
        last_init_scale: factor ``s`` on the last linear map's initial weight and bias, so
            that the block starts near the identity: ``g = s g_0`` to first order
            (1: torch's default init; Residual Flows' ``zero_init`` is ``s = 1e-3``).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), activation: Any = None,
                 coeff: float = 0.97, n_iterations: int = 1, tol: float | None = None,
                 max_iterations: int = 200, preact: bool = False, normalization: Any = None,
                 last_init_scale: float = 1.0):
        super().__init__()
        norm = _normalization(normalization, coeff, n_iterations=n_iterations, tol=tol,
                              max_iterations=max_iterations)
        widths = [int(dim), *[int(h) for h in hidden], int(dim)]
        if min(widths) < 1:
            raise ValueError(f"the widths of g must be at least 1, got dim={dim}, hidden={list(hidden)}")
        layers: list[nn.Module] = []
        width_in, lip_in = widths[0], 1.0
        if preact:
            act = _activation(activation, LipSwish)
            layers.append(act)
            width_in, lip_in = width_in * act.width_factor, act.lipschitz
        for i, width_out in enumerate(widths[1:]):
            layers.append(norm.linear(width_in, width_out, coeff=coeff / lip_in))
            if i < len(widths) - 2:
                act = _activation(activation, LipSwish)
                layers.append(act)
                width_in, lip_in = width_out * act.width_factor, act.lipschitz
        self.net = nn.Sequential(*layers)
        self.dim, self.coeff, self.normalization = int(dim), float(coeff), norm
        _scale_last_map(self.net, last_init_scale)


@register("residual", "conv", description="convolutional bottleneck g: k1 x k1 -> k2 x k2 -> k3 x k3 convs "
                                          "(i-ResNet 3-1-3), linear maps by the normalization")
class ConvResidual(ResidualFunction):
    """The i-ResNet bottleneck: ``in -> hidden -> hidden -> in`` channels, 'same' padding.

    Args:
        in_channels: channels of the input and output.
        input_size: ``(H, W)`` of the input: the operator norm of a k x k
            convolution depends on it (``None``: taken from the first forward).
        hidden_channels: channels of the two hidden feature maps.
        kernel_sizes: one odd kernel size per convolution (default 3, 1, 3).
        activation, coeff, n_iterations, tol, max_iterations, preact, normalization,
            last_init_scale: as :class:`MLPResidual`.
    """

    def __init__(self, in_channels: int, input_size: Sequence[int] | None = None, hidden_channels: int = 512,
                 kernel_sizes: Sequence[int] = (3, 1, 3), activation: Any = None, coeff: float = 0.97,
                 n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200,
                 preact: bool = True, normalization: Any = None, last_init_scale: float = 1.0):
        super().__init__()
        norm = _normalization(normalization, coeff, n_iterations=n_iterations, tol=tol,
                              max_iterations=max_iterations)
        if any(int(k) % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel sizes must be odd ('same' padding keeps the shape), got {kernel_sizes}")
        if int(hidden_channels) < 1 or int(in_channels) < 1:
            raise ValueError(f"the channels of g must be at least 1, got in_channels={in_channels}, "
                             f"hidden_channels={hidden_channels}")
        size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        channels = [int(in_channels)] + [int(hidden_channels)] * (len(kernel_sizes) - 1) + [int(in_channels)]
        layers: list[nn.Module] = []
        width_in, lip_in = channels[0], 1.0
        if preact:
            act = _activation(activation, ELU)
            layers.append(act)
            width_in, lip_in = width_in * act.width_factor, act.lipschitz
        for i, (k, width_out) in enumerate(zip(kernel_sizes, channels[1:])):
            k = int(k)
            layers.append(norm.conv2d(width_in, width_out, k, padding=k // 2, input_size=size,
                                      coeff=coeff / lip_in))
            if i < len(kernel_sizes) - 1:
                act = _activation(activation, ELU)
                layers.append(act)
                width_in, lip_in = width_out * act.width_factor, act.lipschitz
        self.net = nn.Sequential(*layers)
        self.in_channels, self.input_size, self.coeff = int(in_channels), size, float(coeff)
        self.normalization = norm
        _scale_last_map(self.net, last_init_scale)
