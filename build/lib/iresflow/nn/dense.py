"""i-DenseNet residual functions (Perugachi-Diaz et al. 2021), kind ``residual``: ``dense_mlp``, ``dense_conv``.

``g = W_out o h_depth o ... o h_1``, where each dense layer concatenates its
input with a Lipschitz-constrained transformation of it (along the feature /
channel dimension)::

    h(x) = [eta_1 x, eta_2 phi(W x + b)]

and ``W_out`` maps the grown width back to the input's.

Certified bound. For any two inputs ``x, x'`` the two halves are orthogonal
blocks of the output, so

    ||h(x) - h(x')||^2 = eta_1^2 ||x - x'||^2 + eta_2^2 ||phi(Wx + b) - phi(Wx' + b)||^2
                      <= (eta_1^2 + eta_2^2 K^2) ||x - x'||^2,      K = Lip(phi) ||W||,

i.e. ``Lip(h) <= sqrt(eta_1^2 + eta_2^2 K^2)``, with equality along directions
where the transformation attains ``K`` (e.g. ``eta_2 = 0``: ``h`` is ``eta_1`` times
an isometry). Without the weights (``eta = 1``) a concatenation is up to
``sqrt(1 + K^2) > 1``: that is why they are there. The rule kept here:

* ``W`` is normalised to ``coeff / Lip(phi)`` by the normalisation component
  (``normalization``, default ``operator``: :mod:`iresflow.nn.normalization`, as for
  ``mlp`` and ``conv``), so ``K <= coeff <= 1``;
* ``(eta_1, eta_2) = coeff (cos a, sin a)`` with a learnable angle ``a``: the
  constraint ``eta_1^2 + eta_2^2 = coeff^2`` holds exactly for every value of the
  parameter (by construction, no projection), hence
  ``Lip(h) <= sqrt(eta_1^2 + eta_2^2 K^2) <= coeff * sqrt(cos^2 a + sin^2 a) = coeff``;
* ``W_out`` is normalised to ``coeff``, so ``Lip(g) <= coeff^(depth + 1)`` (``c`` per
  map, as for ``mlp`` and ``conv``).

``lipschitz_bound()`` returns the sharper ``||W_out|| * prod_i sqrt(eta_1i^2 + eta_2i^2 K_i^2)``
from the current operator norms and angles. The inequality holds for any ``K``, so with an
unconstrained normalisation (``none``, ``kernel``) the same formula, fed with the layers'
measured norms, is an honest report that may exceed 1 (nothing is certified then).

CLipSwish (the paper's activation) doubles the width, so the map ``W`` of a layer
with growth ``k`` has ``k / 2`` outputs and the layer adds ``k`` features; in
general ``W`` has ``growth / width_factor`` outputs.

Freezing the concatenation weights: with ``freeze_steps = n`` the angle gets a
zero gradient during the first ``n`` optimiser steps (counted by a buffer, saved in
checkpoints, advanced by :meth:`DenseLayer.on_optimizer_step`, which the tasks call
on every module that has it after each step). The parameter stays in the graph, so
every parameter still receives a gradient (DDP requires that); ``learnable_eta=False``
makes the angle a buffer instead.

The log-det estimators' fast Jacobian path needs a plain chain of linear maps and
elementwise activations; a concatenation is not one, so ``linear_chain()`` is
``None`` and they use autograd's vector-Jacobian products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from iresflow.nn.activations import CLipSwish
from iresflow.nn.normalization import Normalization
from iresflow.nn.residual import ResidualFunction, _activation, _normalization
from iresflow.registry import register

__all__ = ["DenseLayer", "DenseResidual", "DenseMLPResidual", "DenseConvResidual", "linear_map"]


def linear_map(norm: Normalization, width_in: int, width_out: int, *, kernel_size: int | None, coeff: float,
               input_size: tuple[int, int] | None = None) -> nn.Module:
    """One linear map of a dense ``g`` (the one place they are made), by the normalisation ``norm``:
    dense when ``kernel_size`` is None, else a 'same'-padded ``kernel_size`` convolution."""
    if kernel_size is None:
        return norm.linear(width_in, width_out, coeff=coeff)
    return norm.conv2d(width_in, width_out, kernel_size, padding=kernel_size // 2, input_size=input_size,
                       coeff=coeff)


class DenseLayer(nn.Module):
    """``h(x) = [eta_1 x, eta_2 act(linear(x))]`` with ``(eta_1, eta_2) = coeff (cos a, sin a)``.

    Args:
        linear: the normalised linear map (``Lip <= coeff / act.lipschitz``).
        activation: its activation.
        coeff: the radius of ``(eta_1, eta_2)``, the layer's bound.
        learnable_eta: the angle ``a`` is a parameter (else a buffer).
        freeze_steps: optimiser steps during which ``a`` gets a zero gradient.
    """

    def __init__(self, linear: nn.Module, activation: nn.Module, coeff: float, learnable_eta: bool = True,
                 freeze_steps: int = 0):
        super().__init__()
        if freeze_steps < 0:
            raise ValueError(f"freeze_steps must be >= 0, got {freeze_steps}")
        self.linear, self.activation = linear, activation
        self.coeff = float(coeff)
        self.freeze_steps = int(freeze_steps)
        angle = torch.tensor(math.pi / 4)  # eta_1 = eta_2, as the paper starts
        if learnable_eta:
            self.angle = nn.Parameter(angle)
        else:
            self.register_buffer("angle", angle)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def eta(self, angle: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eta_1, eta_2)``, on the circle of radius ``coeff`` for every angle."""
        angle = self.angle if angle is None else angle
        return self.coeff * torch.cos(angle), self.coeff * torch.sin(angle)

    def frozen(self) -> bool:
        """Whether the angle is held during the current optimiser step."""
        return bool(self.freeze_steps) and int(self.steps) < self.freeze_steps

    def on_optimizer_step(self) -> None:
        """Count one optimiser step (the tasks call this after every step)."""
        self.steps += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angle = self.angle
        if angle.requires_grad and torch.is_grad_enabled() and self.frozen():
            angle = angle.detach() + 0.0 * angle  # zero gradient, but still a gradient (DDP)
        eta_1, eta_2 = self.eta(angle)
        return torch.cat([eta_1 * x, eta_2 * self.activation(self.linear(x))], dim=1)

    def lipschitz_bound(self) -> float:
        """``sqrt(eta_1^2 + eta_2^2 K^2)`` with ``K = ||W|| * Lip(act)`` (at most ``coeff`` when the
        normalisation certifies ``||W|| <= coeff / Lip(act)``)."""
        k = self.linear.lipschitz_constant() * float(self.activation.lipschitz)
        with torch.no_grad():
            eta_1, eta_2 = (float(e) for e in self.eta())
        return math.sqrt(eta_1 ** 2 + eta_2 ** 2 * k ** 2)

    def extra_repr(self) -> str:
        with torch.no_grad():
            eta_1, eta_2 = (float(e) for e in self.eta())
        return f"coeff={self.coeff}, eta=({eta_1:.4f}, {eta_2:.4f}), freeze_steps={self.freeze_steps}"


class DenseResidual(ResidualFunction):
    """``g = W_out o h_depth o ... o h_1`` from :class:`DenseLayer` s (see the module notes).

    ``make_map(width_in, width_out, final, coeff)`` builds each linear map.
    """

    def __init__(self, width: int, depth: int, growth: int, activation: Any, coeff: float,
                 make_map: Callable[..., nn.Module], learnable_eta: bool, freeze_steps: int,
                 normalization: Normalization):
        super().__init__()
        if not 0 < coeff < 1:
            raise ValueError(f"coeff must lie in (0, 1) for g to be a contraction, got {coeff}")
        if depth < 1 or growth < 1:
            raise ValueError(f"depth and growth must be >= 1, got depth={depth}, growth={growth}")
        layers: list[nn.Module] = []
        out_width = width
        for _ in range(int(depth)):
            act = _activation(activation, CLipSwish)
            if growth % act.width_factor:
                raise ValueError(f"growth {growth} must be a multiple of {type(act).__name__}'s width factor "
                                 f"{act.width_factor} (its map has growth / {act.width_factor} outputs)")
            linear = make_map(width, growth // act.width_factor, final=False, coeff=coeff / act.lipschitz)
            layers.append(DenseLayer(linear, act, coeff, learnable_eta, freeze_steps))
            width += growth
        layers.append(make_map(width, out_width, final=True, coeff=coeff))
        self.net = nn.Sequential(*layers)
        self.coeff = float(coeff)
        self.normalization = normalization

    def linear_chain(self) -> None:
        """``None``: a concatenation is not a chain of linear maps and elementwise activations."""
        return None

    def lipschitz_bound(self) -> float:
        """``||W_out|| * prod_i Lip(h_i)`` from the current norms and angles."""
        bound = self.net[-1].lipschitz_constant()
        for layer in self.net[:-1]:
            bound *= layer.lipschitz_bound()
        return bound


@register("residual", "dense_mlp", description="i-DenseNet g for vectors: dense layers [eta1 x, eta2 act(W x)] "
                                               "(CLipSwish), learnable eta on a circle of radius c")
class DenseMLPResidual(DenseResidual):
    """Fully connected i-DenseNet ``g``: ``dim -> dim + depth * growth -> dim``.

    Args:
        dim: input and output width.
        depth: number of dense layers.
        growth: features each layer adds.
        activation: an activation (or a factory of one); default CLipSwish.
        coeff: bound c of each normalised map and radius of each layer's ``eta``.
        learnable_eta, freeze_steps: see :class:`DenseLayer`.
        n_iterations, tol, max_iterations: power-iteration settings of each map (defaults for
            the normalisation's node).
        normalization: how the linear maps are made: a factory or a built
            :class:`~iresflow.nn.normalization.Normalization` (default ``operator``).
    """

    def __init__(self, dim: int, depth: int = 3, growth: int = 32, activation: Any = None, coeff: float = 0.97,
                 learnable_eta: bool = True, freeze_steps: int = 0, n_iterations: int = 1,
                 tol: float | None = None, max_iterations: int = 200, normalization: Any = None):
        norm = _normalization(normalization, coeff, n_iterations=n_iterations, tol=tol,
                              max_iterations=max_iterations)

        def make_map(width_in, width_out, final, coeff):
            return linear_map(norm, width_in, width_out, kernel_size=None, coeff=coeff)

        super().__init__(int(dim), depth, growth, activation, coeff, make_map, learnable_eta, freeze_steps, norm)
        self.dim = int(dim)


@register("residual", "dense_conv", description="i-DenseNet g for images: dense layers of k x k convs "
                                                "(CLipSwish), a final 1x1 conv, operator-norm normalised")
class DenseConvResidual(DenseResidual):
    """Convolutional i-DenseNet ``g``: ``kernel_size`` convs in the dense layers, a 1x1 conv back.

    Args:
        in_channels: channels of the input and output.
        input_size: ``(H, W)`` (the operator norm of a k x k conv depends on it;
            ``None``: taken from the first forward).
        depth, growth, activation, coeff, learnable_eta, freeze_steps: as :class:`DenseMLPResidual`
            (``growth`` in channels).
        kernel_size: the dense layers' odd kernel size.
        n_iterations, tol, max_iterations, normalization: as :class:`DenseMLPResidual`.
    """

    def __init__(self, in_channels: int, input_size: Sequence[int] | None = None, depth: int = 3,
                 growth: int = 32, kernel_size: int = 3, activation: Any = None, coeff: float = 0.97,
                 learnable_eta: bool = True, freeze_steps: int = 0, n_iterations: int = 1,
                 tol: float | None = None, max_iterations: int = 200, normalization: Any = None):
        if int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding keeps the shape), got {kernel_size}")
        size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        norm = _normalization(normalization, coeff, n_iterations=n_iterations, tol=tol,
                              max_iterations=max_iterations)

        def make_map(width_in, width_out, final, coeff):
            return linear_map(norm, width_in, width_out, kernel_size=1 if final else int(kernel_size), coeff=coeff,
                              input_size=size)

        super().__init__(int(in_channels), depth, growth, activation, coeff, make_map, learnable_eta, freeze_steps,
                         norm)
        self.in_channels, self.input_size = int(in_channels), size
