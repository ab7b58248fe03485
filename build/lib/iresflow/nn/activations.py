"""Activations for contractive residual branches (kind ``activation``).

Every activation declares ``lipschitz`` (its Lipschitz constant, used by ``g``'s
certified bound) and ``width_factor`` (how many times wider its output is than
its input: CLipSwish concatenates two halves). All act on dim 1, so they serve
``[B, D]`` vectors and ``[B, C, H, W]`` feature maps alike.

An elementwise activation is defined once, by its formula: a subclass of
:class:`ElementwiseActivation` writes ``f(x, *theta)``, ``df`` (``f'``) and ``d2f``
(``f''``) as functions of the input and of its parameters ``theta``
(:meth:`~ElementwiseActivation.formula_parameters`, e.g. LipSwish's ``beta``). From
these the base class derives

* ``forward(x) = f(x)``;
* ``forward_and_derivative(x) -> (f(x), f'(x))``, an autograd function whose backward
  is the closed form ``grad_x = grad_y f' + grad_d f''`` (plus the parameters' part),
  itself differentiable: the log-det estimators' layer-chain Jacobian products use it;
* the no-graph hooks of the fused memory-efficient log-det path
  (:mod:`iresflow.nn.logdet.fused`): ``value_and_slope``, ``value_slope_curvature``
  and ``parameter_gradients`` (by autograd on the formulas unless a subclass writes
  the closed form);
* ``max_slope()``: ``|f'|`` sampled on a grid, to check the declared constant.

``df`` returning ``None`` means ``f' = 1`` everywhere, ``d2f`` returning ``None``
means ``f'' = 0`` (ReLU, almost everywhere). A subclass may override the hooks to
share intermediate results (LipSwish computes its sigmoid once); the formulas stay
the definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.registry import register

__all__ = ["Activation", "ElementwiseActivation", "ELU", "LipSwish", "CLipSwish", "Softplus", "ReLU",
           "Identity", "lipswish", "compile_activations", "hook"]

# max_x d/dx [x sigmoid(beta x)] = 1.0998... for every beta > 0 (attained at
# beta x ~ 2.4); dividing by 1.1 makes LipSwish 1-Lipschitz.
LIPSWISH_SCALE = 1.1
# The concatenation [f(x), f(-x)] of CLipSwish has Jacobian norm up to 1.004
# times that of f (Residual Flows' CLipSwish constant).
CLIPSWISH_SCALE = 1.004

Tensor = torch.Tensor


class Activation(nn.Module):
    """Any activation: a declared Lipschitz constant and width factor."""

    lipschitz: float = 1.0
    width_factor: int = 1
    #: ``f`` acts on each entry alone (Jacobian ``diag(f'(x))``)
    elementwise: bool = False


class ElementwiseActivation(Activation):
    """An elementwise activation given by ``f``, ``f'`` and ``f''`` (see the module notes)."""

    elementwise = True
    #: the no-graph hooks run through torch.compile (:func:`compile_activations`)
    compiled: bool = False
    #: ``parameter_gradients`` reads only ``curvature_term`` (not ``grad_d``) when it is given
    #: (a closed form; the default by autograd needs ``grad_d``)
    parameter_gradients_use_curvature_term: bool = False

    # -- the definition -------------------------------------------------------------
    def formula_parameters(self) -> tuple[Tensor, ...]:
        """The tensors ``f`` depends on besides ``x`` (differentiable w.r.t. the module's
        parameters): ``theta`` in the formulas."""
        return ()

    def f(self, x: Tensor, *theta: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor, *theta: Tensor) -> Tensor | None:
        """``f'(x)``; ``None`` means 1 everywhere."""
        raise NotImplementedError

    def d2f(self, x: Tensor, *theta: Tensor) -> Tensor | None:
        """``f''(x)``; ``None`` means 0 everywhere."""
        raise NotImplementedError

    # -- derived -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.f(x, *self.formula_parameters())

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(f(x), f'(x))``, both differentiable (w.r.t. ``x`` and the parameters)."""
        return _ValueAndSlope.apply(self, x, *self.formula_parameters())

    # The no-graph hooks of the fused path. Derived from the formulas; a subclass may
    # override them to share intermediate results.
    def value(self, x: Tensor, *theta: Tensor) -> Tensor:
        """``f(x)`` without a graph."""
        return self.f(x, *theta)

    def value_and_slope(self, x: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(f(x), f'(x))`` without a graph."""
        return self.f(x, *theta), self.df(x, *theta)

    def value_slope_curvature(self, x: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(f(x), f'(x), f''(x))`` without a graph."""
        return self.f(x, *theta), self.df(x, *theta), self.d2f(x, *theta)

    def vjp(self, x: Tensor, theta: tuple[Tensor, ...], grad_y: Tensor, value: Tensor | None = None,
            need_theta: bool = True) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """``(grad_y * f'(x), per theta_i: sum <grad_y, df/dtheta_i>)`` without a graph
        (``value``: ``f(x)``, when the caller has it)."""
        slope = self.df(x, *theta)
        grad_x = grad_y if slope is None else grad_y * slope
        if not need_theta:
            return grad_x, tuple(None for _ in theta)
        return grad_x, self.parameter_gradients(x, theta, grad_y, None, value_and_slope=(value, slope))

    def parameter_gradients(self, x: Tensor, theta: tuple[Tensor, ...], grad_y: Tensor | None,
                            grad_d: Tensor | None, curvature_term: Tensor | None = None,
                            value_and_slope: tuple[Tensor, Tensor | None] | None = None
                            ) -> tuple[Tensor | None, ...]:
        """Per parameter ``theta_i``: ``sum <grad_y, df/dtheta_i> + <grad_d, df'/dtheta_i>``.

        What the caller has already computed may be passed to spare a closed form the work:
        ``curvature_term = grad_d * f''(x)`` and ``value_and_slope = (f(x), f'(x))``.
        Here by autograd on the formulas; differentiable when grad mode is on.
        """
        if not theta:
            return ()
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            th = theta if create else tuple(t.detach().requires_grad_() for t in theta)
            xx = x if create else x.detach()
            total = 0.0
            if grad_y is not None:
                total = total + (grad_y * self.f(xx, *th)).sum()
            slope = self.df(xx, *th) if grad_d is not None else None
            if slope is not None:
                total = total + (grad_d * slope).sum()
            if not isinstance(total, Tensor) or not total.requires_grad:
                return tuple(None for _ in theta)
            return torch.autograd.grad(total, th, create_graph=create, allow_unused=True)

    @torch.no_grad()
    def max_slope(self, lo: float = -30.0, hi: float = 30.0, n: int = 600001) -> float:
        """``max |f'|`` on ``n`` points of ``[lo, hi]`` (float64): at most ``lipschitz``
        for a correctly declared constant."""
        theta = tuple(t.detach().double() for t in self.formula_parameters())
        x = torch.linspace(lo, hi, n, dtype=torch.float64).view(-1, 1)
        slope = self.df(x, *theta)
        return 1.0 if slope is None else float(slope.abs().max())


_COMPILED: dict[tuple[type, str], object] = {}


def hook(act: ElementwiseActivation, name: str):
    """The no-graph hook ``name`` of ``act``, compiled when ``act.compiled`` (one compiled
    function per activation class and hook, shared by all instances)."""
    if not act.compiled:
        return getattr(act, name)
    key = (type(act), name)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(getattr(type(act), name))
    compiled = _COMPILED[key]
    return lambda *args, **kwargs: compiled(act, *args, **kwargs)


def compile_activations(module: nn.Module, enabled: bool = True) -> int:
    """Run the fused log-det paths' activation pieces (value, slope, curvature, vjp; no graph)
    through ``torch.compile`` for every formula-defined activation in ``module``: each
    piece becomes one fused kernel instead of several elementwise passes. Paths that need
    autograd's double backward (a user-defined ``g``, the exact estimator) stay eager.
    Returns how many activations were switched."""
    count = 0
    for m in module.modules():
        if isinstance(m, ElementwiseActivation):
            m.compiled = bool(enabled)
            count += 1
    return count


class _ValueAndSlope(torch.autograd.Function):
    """``(f(x), f'(x))`` with the closed-form backward ``(grad_y f' + grad_d f'', parameters)``.

    The backward is written with the formulas' torch ops, so it can be differentiated again.
    """

    @staticmethod
    def forward(ctx, act: ElementwiseActivation, x: Tensor, *theta: Tensor):
        y, d = hook(act, "value_and_slope")(x, *theta)
        ctx.act = act
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, d, *theta)
        return y, d

    @staticmethod
    def backward(ctx, grad_y, grad_d):
        x, d, *theta = ctx.saved_tensors
        act = ctx.act
        if torch.is_grad_enabled():  # differentiable: the slope as a function of x and theta
            d = act.df(x, *theta)
        grad_x = term = None
        if grad_y is not None:
            grad_x = grad_y if d is None else grad_y * d
        if grad_d is not None:
            curvature = act.d2f(x, *theta)
            if curvature is not None:
                term = grad_d * curvature
                grad_x = term if grad_x is None else grad_x + term
        # (the curvature term is handed on: a closed form of the parameter gradients needs it too)
        grad_theta = (act.parameter_gradients(x, tuple(theta), grad_y, grad_d, curvature_term=term)
                      if any(ctx.needs_input_grad[2:]) else tuple(None for _ in theta))
        return (None, grad_x, *grad_theta)


# --------------------------------------------------------------------------- the activations


@register("activation", "elu", description="ELU (alpha=1): smooth, 1-Lipschitz (the i-ResNet paper's choice)")
class ELU(ElementwiseActivation):
    """``f = x`` for ``x > 0``, ``e^x - 1`` otherwise."""

    def f(self, x):
        return F.elu(x)

    def df(self, x):
        return torch.where(x > 0, 1.0, torch.exp(x.clamp(max=0.0)))

    def d2f(self, x):
        return torch.where(x > 0, 0.0, torch.exp(x.clamp(max=0.0)))

    # (f' = f + 1 for x < 0 would be one pass shorter, but cancels badly in bfloat16)
    def value_slope_curvature(self, x):
        slope = torch.exp(x.clamp(max=0.0))
        return F.elu(x), slope, slope.masked_fill(x > 0, 0.0)

    def value_and_slope(self, x):
        return F.elu(x), torch.exp(x.clamp(max=0.0))


@register("activation", "softplus", description="softplus log(1+e^x): 1-Lipschitz, smooth")
class Softplus(ElementwiseActivation):
    def f(self, x):
        return F.softplus(x)

    def df(self, x):
        return torch.sigmoid(x)

    def d2f(self, x):
        s = torch.sigmoid(x)
        return s * (1.0 - s)

    def value_slope_curvature(self, x):
        s = torch.sigmoid(x)
        return F.softplus(x), s, s * (1.0 - s)


@register("activation", "relu", description="ReLU: 1-Lipschitz but not smooth (the log-det series needs C1; "
                                            "for classification only)")
class ReLU(ElementwiseActivation):
    def f(self, x):
        return F.relu(x)

    def df(self, x):
        return (x > 0).to(x.dtype)

    def d2f(self, x):
        return None  # 0 almost everywhere


@register("activation", "identity", description="identity (a linear g; for tests and ablations)")
class Identity(ElementwiseActivation):
    def f(self, x):
        return x

    def df(self, x):
        return None

    def d2f(self, x):
        return None


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """``x * sigmoid(beta x) / 1.1``: 1-Lipschitz for every ``beta > 0``."""
    return x * torch.sigmoid(beta * x) / LIPSWISH_SCALE


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class _LearnableBeta(nn.Module):
    """The Swish slope of LipSwish and CLipSwish: ``beta = softplus(raw_beta) > 0``, a parameter, or
    a buffer when fixed (never a parameter without a gradient: DDP)."""

    def __init__(self, beta: float = 1.0, learnable: bool = True):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"LipSwish beta must be positive, got {beta}")
        raw = torch.tensor(_inverse_softplus(beta))
        if learnable:
            self.raw_beta = nn.Parameter(raw)
        else:
            self.register_buffer("raw_beta", raw)

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.raw_beta)


def _host(t: Tensor):
    """A 0-dim CPU tensor as a Python number (scalar ops then cost no dispatch); else as is
    (also while torch.compile traces: a host number would break its graph)."""
    if t.device.type == "cpu" and t.dim() == 0 and not torch.compiler.is_compiling():
        return t.item()
    return t


def _constant(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor (broadcast by the ops it enters: nothing to fill)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return torch.dot(a.reshape(-1), b.reshape(-1))


@register("activation", "lipswish",
          description="LipSwish x*sigmoid(beta x)/1.1, learnable beta > 0 (Residual Flows): 1-Lipschitz, "
                      "derivative not saturating at 1")
class LipSwish(_LearnableBeta, ElementwiseActivation):
    """``f = x s / K`` with ``s = sigmoid(beta x)``, ``K = 1.1``; with ``z = beta x``::

        f'  = s (1 + z (1 - s)) / K
        f'' = beta s (1 - s) (2 + z (1 - 2 s)) / K
        df/dbeta = (x f' - f) / beta,   df'/dbeta = x f'' / beta

    ``beta = softplus(raw)`` keeps it positive (so the 1/1.1 bound holds) while learnable.
    """

    parameter_gradients_use_curvature_term = True

    def formula_parameters(self):
        return (self.beta,)

    def f(self, x, beta):
        return lipswish(x, beta)

    def df(self, x, beta):
        z = beta * x
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s)) / LIPSWISH_SCALE

    def d2f(self, x, beta):
        z = beta * x
        s = torch.sigmoid(z)
        return beta * s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s)) / LIPSWISH_SCALE

    # The hooks below compute the same formulas in fewer passes: f = silu(z) / (beta K) and
    # f' = silu'(z) / K with z = beta x (aten's fused silu and silu_backward), in place.
    def value(self, x, beta):
        b = _host(beta)
        return F.silu(x * b).mul_(1.0 / (b * LIPSWISH_SCALE))

    def value_and_slope(self, x, beta):
        y, slope, _, _ = self._value_slope(x, _host(beta))
        return y, slope

    def value_slope_curvature(self, x, beta):
        b = _host(beta)
        y, slope, z, s = self._value_slope(x, b)
        # f'' = (beta / K) s (1 - s) (2 + z - 2 z s), in the buffers of z and s
        curvature = z.addcmul_(z, s, value=-2.0).add_(2.0)
        curvature.mul_(s.addcmul_(s, s, value=-1.0)).mul_(b / LIPSWISH_SCALE)
        return y, slope, curvature

    @staticmethod
    def _value_slope(x, b):
        z = x * b
        s = torch.sigmoid(z)
        y = torch.addcmul(_constant(0.0, x), x, s, value=1.0 / LIPSWISH_SCALE)  # x s / K in one pass
        slope = torch.ops.aten.silu_backward(_constant(1.0 / LIPSWISH_SCALE, z).expand_as(z), z)
        return y, slope, z, s

    def vjp(self, x, theta, grad_y, value=None, need_theta=True):
        (beta,) = theta
        b = _host(beta)
        grad_x = torch.ops.aten.silu_backward(grad_y, x * b).mul_(1.0 / LIPSWISH_SCALE)
        if not need_theta:
            return grad_x, (None,)
        y = F.silu(x * b).mul_(1.0 / (b * LIPSWISH_SCALE)) if value is None else value
        # sum grad_y df/dbeta = (<grad_y f', x> - <grad_y, f>) / beta
        return grad_x, (((_dot(grad_x, x) - _dot(grad_y, y)) / b).reshape(beta.shape),)

    def parameter_gradients(self, x, theta, grad_y, grad_d, curvature_term=None, value_and_slope=None):
        (beta,) = theta
        if torch.is_grad_enabled():  # differentiable: the formulas as written
            return super().parameter_gradients(x, theta, grad_y, grad_d)
        b = _host(beta)
        total = None
        if grad_y is not None:  # sum grad_y (x f' - f) / beta
            y, slope = value_and_slope if value_and_slope is not None else self.value_and_slope(x, beta)
            total = (_dot(grad_y * slope, x) - _dot(grad_y, y)) / b
        if grad_d is not None or curvature_term is not None:  # sum grad_d x f'' / beta
            if curvature_term is None:
                curvature_term = grad_d * self.d2f(x, beta)
            part = _dot(curvature_term, x) / b
            total = part if total is None else total + part
        return (None if total is None else total.reshape(beta.shape),)


@register("activation", "clipswish",
          description="CLipSwish [LipSwish(x), LipSwish(-x)]/1.004 (i-DenseNets): 1-Lipschitz, doubles the width")
class CLipSwish(_LearnableBeta, Activation):
    """Concatenating ``f(x)`` and ``f(-x)`` keeps information a single swish squashes. Not
    elementwise (the Jacobian stacks two diagonals), so the estimators use autograd for it."""

    width_factor = 2

    def forward(self, x: Tensor) -> Tensor:
        beta = self.beta
        return torch.cat([lipswish(x, beta), lipswish(-x, beta)], dim=1) / CLIPSWISH_SCALE
