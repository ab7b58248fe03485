"""Jacobian-product backends: ``w^T J_g(x)`` for every sample, behind one small protocol.

A backend is made from one evaluation of ``g`` and offers ``out`` (``g(x)``) and
``vjp(w, create_graph)``: for ``w`` of shape ``[P, B, *sample_shape]`` (``P`` vectors
per sample) it returns ``w_pb^T J_b`` in the same shape. Samples are independent, so
one product of the batch serves every sample.

* :class:`AutogradProducts` -- any ``g``: autograd vector-Jacobian products of ``g(x)``
  (the batch repeated ``P`` times, so one ``autograd.grad`` call serves all vectors);
* :class:`ChainProducts` -- ``g`` a chain (:mod:`.chain`): the factors ``W_i`` and
  ``D_i = diag(f'(x_i))`` kept from the one evaluation and applied directly. Without
  ``create_graph`` the detached factors are used; with it the factors carry their graph,
  so autograd differentiates ``w^T J`` w.r.t. the weights and, through ``f'(x_i)``
  (closed-form ``f''``), w.r.t. ``x`` and every earlier parameter -- the second-order
  terms a double backward through ``g`` would form;
* :class:`DenseProducts` -- a materialised per-sample Jacobian ``[B, D, D]`` (small ``D``).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.nn.conv_ops import conv_input_grad
from iresflow.nn.logdet import gemm
from iresflow.nn.logdet.chain import ChainLayer, LayerKind, linear_weight

__all__ = ["JacobianProducts", "AutogradProducts", "ChainProducts", "DenseProducts"]

Tensor = torch.Tensor


class JacobianProducts(Protocol):
    out: Tensor  # g(x), [B, *sample_shape]

    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor:
        """``w^T J`` for ``w`` of shape ``[P, B, *sample_shape]``."""
        ...


class AutogradProducts:
    """``w^T J`` by autograd. ``g`` runs once on the batch repeated ``copies`` times, so that
    up to ``copies`` vectors per sample go through one vector-Jacobian product."""

    def __init__(self, g: nn.Module, x: Tensor, copies: int = 1):
        self.copies, self.batch = copies, x.shape[0]
        self.x = x if copies == 1 else x.repeat(copies, *([1] * (x.dim() - 1)))
        self.all_out = g(self.x)
        self.out = self.all_out[: self.batch]

    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor:
        p = w.shape[0]
        if p > self.copies:
            raise ValueError(f"{p} vectors per sample, but g was evaluated for {self.copies}")
        if p < self.copies:  # the other copies get zero vectors
            w = torch.cat([w, w.new_zeros(self.copies - p, *w.shape[1:])])
        grad = torch.autograd.grad(self.all_out, self.x, w.reshape(self.x.shape), create_graph=create_graph,
                                   retain_graph=True)[0]
        return grad.view(self.copies, *w.shape[1:])[:p]


class ChainProducts:
    """The chain evaluated layer by layer, keeping each layer's Jacobian factor."""

    def __init__(self, chain: list[ChainLayer], x: Tensor):
        h = x
        factors: list[tuple[ChainLayer, Tensor]] = []  # in the order a vjp applies them
        for layer in chain:
            m = layer.module
            if layer.kind is LayerKind.LINEAR:
                w = linear_weight(m, h)
                h = F.linear(h, w, m.bias)
                factors.append((layer, w))
            elif layer.kind is LayerKind.CONV:
                w = linear_weight(m, h)
                h = F.conv2d(h, w, m.bias, m.stride, m.padding, m.dilation)
                factors.append((layer, w))
            else:
                h, slope = m.forward_and_derivative(h)
                if slope is not None:
                    factors.append((layer, slope))
        self.out = h
        self.factors = factors[::-1]
        self.detached = [(layer, f.detach()) for layer, f in self.factors]

    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor:
        lead = w.shape[:2]
        for layer, factor in (self.factors if create_graph else self.detached):
            if layer.kind is LayerKind.LINEAR:
                # (without a graph: oneDNN where it is faster, see gemm)
                w = w @ factor if create_graph else gemm.linear(w, factor.t())
            elif layer.kind is LayerKind.CONV:
                flat = conv_input_grad(layer.strategy, layer.module, w.flatten(0, 1), factor, layer.out_padding)
                w = flat.view(*lead, *flat.shape[1:])
            else:
                w = w * factor
        return w


class DenseProducts:
    """``w^T J`` from a materialised per-sample Jacobian ``jac[b, i, j] = d g_i / d x_j``."""

    def __init__(self, jac: Tensor, out: Tensor | None = None):
        self.jac, self.out = jac, out

    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor:
        jac = self.jac if w.dtype == self.jac.dtype else self.jac.to(w.dtype)
        return torch.matmul(w.unsqueeze(-2), jac).squeeze(-2)
