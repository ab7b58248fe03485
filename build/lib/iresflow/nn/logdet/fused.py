"""The fused memory-efficient path: a formula-defined chain evaluated and differentiated by hand.

For ``g`` a chain of linear maps and formula-defined activations (:mod:`.chain`),
the memory-efficient estimator is computed without autograd. The gradient of the
Neumann surrogate ``s = sum_{p,b} u^T J v`` (:mod:`.series`) has two parts:

* direct: for a linear map ``W``, ``c^T t`` (``t``: the tangent ``J_{<i} v`` at its
  input, ``c``: the cotangent ``u^T J_{>i}`` at its output); for an activation's own
  parameters, ``sum (c * t) df'/dtheta``;
* through the network: ``s`` depends on each activation's input ``x_i`` through
  ``f'(x_i)``, with gradient ``e_i = (c * t) f''(x_i)``; ``e_i`` travels back to ``x``
  and every earlier parameter like any gradient of ``g``.

The forward evaluates ``g`` (keeping every activation's ``f'`` and ``f''``), the
series from vector-Jacobian products of that evaluation -- or, for inputs of at most
``DENSE_JACOBIAN_MAX_DIM`` features, from the per-sample Jacobian of ``D`` forward-mode
passes, whose powers then cost nothing -- and one tangent and one cotangent pass for
the direct gradients and the ``e_i``. It keeps each activation's input and ``e_i``
(constant in the number of terms); the backward recomputes the activations' values
and slopes from their inputs and sends ``grad_gx`` and ``grad_logdet * e_i`` back
through ``g`` in one pass. The effective parameters (normalised weights, biases,
activation parameters) are the autograd function's inputs, so autograd only
differentiates the small maps from them to the module parameters (the normalisation).

Samples are independent, so per-sample upstream weights are exact for ``e_i``; the
direct parts are sums over the batch, so for non-uniform weights they (and the
``e_i``) are formed again with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from iresflow.nn.activations import hook
from iresflow.nn.conv_ops import conv_forward, conv_input_grad, conv_weight_grad
from iresflow.nn.logdet import gemm
from iresflow.nn.logdet.chain import ChainLayer, LayerKind, linear_weight
from iresflow.nn.logdet.products import DenseProducts
from iresflow.nn.logdet.series import matrix_series, series
from iresflow.nn.logdet.trace import TraceEstimator, probes_for

__all__ = ["DENSE_JACOBIAN_MAX_DIM", "FusedChain", "memory_efficient_logdet", "logdet_value"]

Tensor = torch.Tensor

# Vector inputs [B, D] with D at most this (and at most the number of products the series
# would take) use the materialised Jacobian: D forward-mode passes.
DENSE_JACOBIAN_MAX_DIM = 8


# --------------------------------------------------------------------------- the chain and its parameters


@dataclass(frozen=True)
class Slots:
    """Where a layer's tensors sit in :attr:`FusedChain.params`."""

    weight: int | None = None
    bias: int | None = None
    theta: tuple[int, ...] = ()


@dataclass
class FusedChain:
    """The layers of ``g`` and their effective parameters (the tensors the layers apply)."""

    layers: list[ChainLayer]
    slots: list[Slots]
    params: list[Tensor]

    @classmethod
    def of(cls, layers: list[ChainLayer], x: Tensor) -> "FusedChain":
        slots, params = [], []

        def add(t):
            params.append(t)
            return len(params) - 1

        for layer in layers:
            m = layer.module
            if layer.is_map:
                # weight_for runs the training-time power iterations (and, for a conv, checks
                # the input size: all it reads of its argument)
                w = linear_weight(m, x if layer.kind is LayerKind.LINEAR else x.new_empty((0, *layer.in_shape)))
                slots.append(Slots(weight=add(w), bias=None if m.bias is None else add(m.bias)))
            else:
                slots.append(Slots(theta=tuple(add(t) for t in m.formula_parameters())))
        return cls(layers, slots, params)

    def with_params(self, params) -> "FusedChain":
        return FusedChain(self.layers, self.slots, list(params))

    def theta(self, i: int) -> tuple[Tensor, ...]:
        return tuple(self.params[j] for j in self.slots[i].theta)


# --------------------------------------------------------------------------- one evaluation


@dataclass
class Evaluation:
    """``g`` at ``x``, with what its Jacobian products need (no graph)."""

    inputs: list[Tensor]  # the input of every layer
    slopes: list[Tensor | None]  # f' of each activation (None: 1, or not an activation)
    curvatures: list[Tensor | None]  # f'' of each activation (None: 0, or not computed)
    out: Tensor


def evaluate(chain: FusedChain, x: Tensor, curvature: bool) -> Evaluation:
    inputs, slopes, curvatures = [], [], []
    h = x
    for i, (layer, slots) in enumerate(zip(chain.layers, chain.slots)):
        inputs.append(h)
        d = d2 = None
        if layer.is_map:
            bias = None if slots.bias is None else chain.params[slots.bias]
            h = _apply(layer, chain.params[slots.weight], h, bias)
        elif curvature:
            h, d, d2 = hook(layer.module, "value_slope_curvature")(h, *chain.theta(i))
        else:
            h, d = hook(layer.module, "value_and_slope")(h, *chain.theta(i))
        slopes.append(d)
        curvatures.append(d2)
    return Evaluation(inputs, slopes, curvatures, h)


# The maps below take tensors of one sample batch (``[B, ...]``) or of several probes
# (``[P, B, ...]``): a dense map acts on the last dim, a convolution on the last three.


def _apply(layer: ChainLayer, w: Tensor, t: Tensor, bias: Tensor | None = None) -> Tensor:
    """The layer's linear map on ``t``."""
    if layer.kind is LayerKind.LINEAR:
        return gemm.linear(t, w, bias)
    if t.dim() == 4:
        return conv_forward(layer.strategy, layer.module, t, w, bias)
    flat = conv_forward(layer.strategy, layer.module, t.flatten(0, 1), w, bias)
    return flat.view(*t.shape[:2], *flat.shape[1:])


def _adjoint(layer: ChainLayer, w: Tensor, c: Tensor) -> Tensor:
    """``c^T W``: the map's adjoint on ``c``."""
    if layer.kind is LayerKind.LINEAR:
        if c.dim() == 2:
            return gemm.matmul(c, w)
        return gemm.matmul(c.flatten(0, 1), w).view(*c.shape[:2], w.shape[1])
    if c.dim() == 4:
        return conv_input_grad(layer.strategy, layer.module, c, w, layer.out_padding)
    flat = conv_input_grad(layer.strategy, layer.module, c.flatten(0, 1), w, layer.out_padding)
    return flat.view(*c.shape[:2], *flat.shape[1:])


def _weight_grad(layer: ChainLayer, w: Tensor, c: Tensor, t: Tensor) -> Tensor:
    """``sum c^T t`` over every leading dim: the gradient of ``<c, W t>`` w.r.t. ``W``."""
    if layer.kind is LayerKind.LINEAR:
        if c.dim() == 2:
            return gemm.matmul(c.t(), t)
        return gemm.matmul(c.flatten(0, 1).t(), t.flatten(0, 1))
    if c.dim() == 4:
        return conv_weight_grad(layer.strategy, layer.module, c, t, w)
    return conv_weight_grad(layer.strategy, layer.module, c.flatten(0, 1), t.flatten(0, 1), w)


class EvaluationProducts:
    """``w^T J`` from an :class:`Evaluation` (a Jacobian-product backend, :mod:`.products`)."""

    def __init__(self, chain: FusedChain, ev: Evaluation):
        self.chain, self.ev, self.out = chain, ev, ev.out

    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor:
        owned = False
        for i in range(len(self.chain.layers) - 1, -1, -1):
            layer = self.chain.layers[i]
            if layer.is_map:
                w, owned = _adjoint(layer, self.chain.params[self.chain.slots[i].weight], w), True
            elif self.ev.slopes[i] is not None:
                w = w.mul_(self.ev.slopes[i]) if owned else w * self.ev.slopes[i]
                owned = True
        return w


def tangents(chain: FusedChain, ev: Evaluation, v: Tensor) -> list[Tensor]:
    """The tangent ``J_{<i} v`` at the input of every layer (forward mode)."""
    out, t = [], v
    for i, layer in enumerate(chain.layers):
        out.append(t)
        if i == len(chain.layers) - 1:
            break
        if layer.is_map:
            t = _apply(layer, chain.params[chain.slots[i].weight], t)
        elif ev.slopes[i] is not None:
            t = t * ev.slopes[i]
    return out


def dense_jacobian(chain: FusedChain, ev: Evaluation, x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """For inputs ``[B, D]``: the per-sample Jacobian ``[B, D, D]`` from the ``D`` forward-mode
    passes ``J e_j`` (stacked on a leading dim), and those passes' tangents at the input of
    every layer that follows a linear map (the others follow by one product with ``f'``)."""
    b, dim = x.shape
    t = torch.eye(dim, dtype=x.dtype, device=x.device)[:, None, :].expand(dim, b, dim).contiguous()
    basis: dict[int, Tensor] = {}
    for i, layer in enumerate(chain.layers):
        if i > 0 and chain.layers[i - 1].is_map:
            basis[i] = t
        if layer.is_map:
            t = _apply(layer, chain.params[chain.slots[i].weight], t)
        elif ev.slopes[i] is not None:
            t = t * ev.slopes[i] if i in basis else t.mul_(ev.slopes[i])
    return t.permute(1, 2, 0), basis  # t[j, b] = J_b e_j, the column j


def tangents_from_basis(chain: FusedChain, ev: Evaluation, basis: dict[int, Tensor], v: Tensor) -> list[Tensor]:
    """:func:`tangents` of ``v`` (``[B, D]`` or ``[P, B, D]``) as combinations
    ``J v = sum_j v_j (J e_j)``."""
    coordinates = [v[..., j:j + 1] for j in range(v.shape[-1])]
    out, t = [], v
    for i in range(len(chain.layers)):
        if i in basis:
            columns = basis[i]
            t = columns[0] * coordinates[0]
            for j in range(1, len(coordinates)):
                t.addcmul_(columns[j], coordinates[j])
        elif i > 0 and ev.slopes[i - 1] is not None:  # after an activation
            t = t * ev.slopes[i - 1]
        out.append(t)
    return out


# --------------------------------------------------------------------------- the surrogate's gradients


@dataclass
class SurrogateGradients:
    direct: list[Tensor | None]  # per parameter
    curvature_grads: list[Tensor | None]  # e_i per layer (activations with f'' != 0)


def surrogate_gradients(chain: FusedChain, ev: Evaluation, u: Tensor, tangent_at: list[Tensor],
                        need: list[bool], need_x: bool) -> SurrogateGradients:
    """The direct parameter gradients of ``s = sum u^T J v`` and each activation's ``e_i``
    (see the module notes); ``tangent_at[i]`` is ``J_{<i} v``. ``u`` and the tangents are
    ``[B, ...]`` (one probe) or ``[P, B, ...]`` (several)."""
    several = u.dim() > ev.out.dim()
    params = chain.params
    direct: list[Tensor | None] = [None] * len(params)
    curvature_grads: list[Tensor | None] = [None] * len(chain.layers)
    c, owned = u, False  # the cotangent u^T J_{>i} at the current layer's output
    for i in range(len(chain.layers) - 1, -1, -1):
        layer, slots, first = chain.layers[i], chain.slots[i], i == 0
        if layer.is_map:
            w = params[slots.weight]
            if need[slots.weight]:
                direct[slots.weight] = _weight_grad(layer, w, c, tangent_at[i])
            if not first:
                c, owned = _adjoint(layer, w, c), True
            continue
        slope, curvature = ev.slopes[i], ev.curvatures[i]
        need_theta = any(need[j] for j in slots.theta)
        wants_e = curvature is not None and (need_x or not first)
        if need_theta or wants_e:
            ct = c * tangent_at[i]
            if several:  # the probes share the point
                ct = ct.sum(0)
            if curvature is None:
                e = None
            elif need_theta and not layer.module.parameter_gradients_use_curvature_term:
                e = ct * curvature  # (ct itself is needed for the parameters)
            else:
                e = ct.mul_(curvature)
            if need_theta:
                grads = layer.module.parameter_gradients(ev.inputs[i], chain.theta(i), None, ct, curvature_term=e)
                for j, grad in zip(slots.theta, grads):
                    direct[j] = grad if need[j] else None
            if wants_e:
                curvature_grads[i] = e
        if not first and slope is not None:
            c = c.mul_(slope) if owned else c * slope
            owned = True
    return SurrogateGradients(direct, curvature_grads)


# --------------------------------------------------------------------------- the one backward pass


@dataclass
class Kept:
    """What the backward needs, routed through ``ctx.save_for_backward`` (so saved-tensor
    hooks see it): the block input, the layer inputs that cannot be recomputed (every
    activation's, and those of maps not preceded by an activation), each activation's
    ``e_i``, the direct gradients and (for per-sample weights) the probes and Neumann vectors."""

    x: Tensor
    inputs: list[Tensor | None]
    curvature_grads: list[Tensor | None]
    direct: list[Tensor | None]
    neumann: Tensor
    probes: Tensor


def keep_inputs(chain: FusedChain, ev: Evaluation) -> list[Tensor | None]:
    return [None if i > 0 and not chain.layers[i - 1].is_map and layer.is_map else ev.inputs[i]
            for i, layer in enumerate(chain.layers)]


def backward_pass(chain: FusedChain, kept: Kept, grad_out: Tensor, scale, curvature_grads, need: list[bool],
                  need_x: bool) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of ``<grad_out, g(x)> + sum_i <scale * e_i, x_i>`` w.r.t. ``x`` and the
    parameters (``scale``: a number or a per-sample column)."""
    params, layers = chain.params, chain.layers
    grads: list[Tensor | None] = [None] * len(params)
    values: dict[int, Tensor] = {}  # activations' values, recomputed from their kept inputs

    delta = grad_out
    for i in range(len(layers) - 1, -1, -1):
        layer, slots, go_on = layers[i], chain.slots[i], i > 0 or need_x
        if layer.is_map:
            w = params[slots.weight]
            if need[slots.weight]:
                layer_input = kept.inputs[i]
                if layer_input is None:  # the value of the activation before it
                    layer_input = values[i - 1] = hook(layers[i - 1].module, "value")(kept.inputs[i - 1],
                                                                                      *chain.theta(i - 1))
                grads[slots.weight] = _weight_grad(layer, w, delta, layer_input)
            if slots.bias is not None and need[slots.bias]:
                grads[slots.bias] = delta.sum(0) if layer.kind is LayerKind.LINEAR else delta.sum((0, 2, 3))
            delta = _adjoint(layer, w, delta) if go_on else None
        else:
            need_theta = any(need[j] for j in slots.theta)
            if go_on or need_theta:
                through, theta_grads = hook(layer.module, "vjp")(kept.inputs[i], chain.theta(i), delta,
                                                                 values.pop(i, None), need_theta)
                for j, grad in zip(slots.theta, theta_grads):
                    grads[j] = grad if need[j] else None
                delta = through
            if go_on:
                e = curvature_grads[i]
                if e is not None:
                    delta = delta.clone() if delta is grad_out else delta
                    delta = delta.addcmul_(e, scale) if isinstance(scale, Tensor) else delta.add_(e, alpha=scale)
            else:
                delta = None
        if delta is None:
            break
    return delta, grads


# --------------------------------------------------------------------------- the estimator


def _series_products(chain, ev, x, trace, given, n, term_weights, neumann):
    """The probes, the series (value, Neumann vectors) and the tangents of the probes."""
    n_vectors = given.shape[0] if given is not None else trace.n_vectors(x)
    dim = x.shape[-1]
    dense = (x.dim() == 2 and dim <= DENSE_JACOBIAN_MAX_DIM and dim <= n * n_vectors
             and all(layer.kind is not LayerKind.CONV for layer in chain.layers))
    if dense:
        jac, basis = dense_jacobian(chain, ev, x)
        products = DenseProducts(jac, ev.out)
    else:
        products = EvaluationProducts(chain, ev)
    probes = probes_for(trace, given, x, products)
    if dense:
        value, u = matrix_series(jac, probes, n, term_weights, neumann=neumann)
    else:
        value, u = series(products, probes, n, term_weights, create_graph=False, neumann=neumann)
    if not neumann:
        return probes, value, None, None
    u = u.to(x.dtype)
    v = probes.vectors
    if v.shape[0] == 1:  # one probe: work on [B, ...]
        u, v = u[0], v[0]
    tangent_at = tangents_from_basis(chain, ev, basis, v) if dense else tangents(chain, ev, v)
    return probes, value, u, tangent_at


def logdet_value(chain: FusedChain, x: Tensor, trace: TraceEstimator, given: Tensor | None, n: int,
                 term_weights: list[float]) -> tuple[Tensor, Tensor]:
    """``(g(x), log-det)`` without any graph."""
    ev = evaluate(chain, x, curvature=False)
    _, value, _, _ = _series_products(chain, ev, x, trace, given, n, term_weights, neumann=False)
    return ev.out, value


def memory_efficient_logdet(chain: FusedChain, x: Tensor, trace: TraceEstimator, given: Tensor | None, n: int,
                            term_weights: list[float]) -> tuple[Tensor, Tensor]:
    """``(g(x), log-det)`` with the memory-efficient Neumann gradient, by hand."""
    return _FusedMemoryEfficient.apply(chain, trace, given, n, term_weights, x, *chain.params)


class _FusedMemoryEfficient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain, trace, given, n, term_weights, x, *params):
        chain = chain.with_params(params)
        need, need_x = list(ctx.needs_input_grad[6:]), ctx.needs_input_grad[5]
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ev = evaluate(chain, x, curvature=True)
        probes, value, u, tangent_at = _series_products(chain, ev, x, trace, given, n, term_weights, neumann=True)
        grads = surrogate_gradients(chain, ev, u, tangent_at, need, need_x)
        kept = Kept(x, keep_inputs(chain, ev), grads.curvature_grads, grads.direct, u, probes.vectors)
        tensors, ctx.layout = _pack(kept)
        ctx.save_for_backward(*tensors, *params)
        ctx.chain, ctx.n_params = chain.with_params([]), len(params)
        return ev.out, value

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):
        saved = ctx.saved_tensors
        kept = _unpack(ctx.layout, saved)
        chain = ctx.chain.with_params(saved[len(saved) - ctx.n_params:])
        ctx.chain = None
        need, need_x = list(ctx.needs_input_grad[6:]), ctx.needs_input_grad[5]
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if bool((grad_logdet == grad_logdet[0]).all()):
                scale = grad_logdet[0]
                dx, grads = backward_pass(chain, kept, grad_gx, scale, kept.curvature_grads, need, need_x)
                direct = kept.direct
                total = [_combine(a, c, scale) for a, c in zip(grads, direct)]
            else:
                # Per-sample weights: the surrogate again, from u scaled per sample (sum_b w_b s_b is
                # the surrogate of that u).
                ev = evaluate(chain, kept.x, curvature=True)
                u, v = kept.neumann, kept.probes
                if v.dim() > u.dim():  # one probe: u was kept as [B, ...]
                    v = v[0]
                weights = grad_logdet.view(-1, *([1] * (kept.x.dim() - 1)))
                again = surrogate_gradients(chain, ev, u * weights, tangents(chain, ev, v), need, need_x)
                dx, grads = backward_pass(chain, kept, grad_gx, 1.0, again.curvature_grads, need, need_x)
                total = [_combine(a, c, 1.0) for a, c in zip(grads, again.direct)]
        return (None, None, None, None, None, dx if need_x else None, *total)


def _combine(through_g: Tensor | None, direct: Tensor | None, scale) -> Tensor | None:
    """``through_g + scale * direct`` (either may be missing)."""
    if direct is None:
        return through_g
    if through_g is None:
        return direct * scale
    return through_g.addcmul_(direct, scale) if isinstance(scale, Tensor) else through_g.add_(direct, alpha=scale)


def _pack(kept: Kept) -> tuple[list[Tensor], dict]:
    """The tensors of ``kept`` as a flat list and where each one goes."""
    tensors: list[Tensor] = []

    def put(t):
        if t is None:
            return None
        tensors.append(t)
        return len(tensors) - 1

    layout = {}
    for f in fields(kept):
        value = getattr(kept, f.name)
        layout[f.name] = [put(t) for t in value] if isinstance(value, list) else put(value)
    return tensors, layout


def _unpack(layout: dict, saved: tuple[Tensor, ...]) -> Kept:
    def get(k):
        return None if k is None else saved[k]

    return Kept(**{name: [get(k) for k in where] if isinstance(where, list) else get(where)
                   for name, where in layout.items()})
