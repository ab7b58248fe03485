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
           "Identity", "lipswish"]

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

    def value_and_slope(self, x: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(f(x), f'(x))`` without a graph."""
        return self.f(x, *theta), self.df(x, *theta)

    def value_slope_curvature(self, x: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(f(x), f'(x), f''(x))`` without a graph."""
        return self.f(x, *theta), self.df(x, *theta), self.d2f(x, *theta)

    def parameter_gradients(self, x: Tensor, theta: tuple[Tensor, ...], grad_y: Tensor | None,
                            grad_d: Tensor | None, curvature_term: Tensor | None = None
                            ) -> tuple[Tensor | None, ...]:
        """Per parameter ``theta_i``: ``sum <grad_y, df/dtheta_i> + <grad_d, df'/dtheta_i>``.

        ``curvature_term``, when given, is ``grad_d * f''(x)`` (a closed form may use it).
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


class _ValueAndSlope(torch.autograd.Function):
    """``(f(x), f'(x))`` with the closed-form backward ``(grad_y f' + grad_d f'', parameters)``.

    The backward is written with the formulas' torch ops, so it can be differentiated again.
    """

    @staticmethod
    def forward(ctx, act: ElementwiseActivation, x: Tensor, *theta: Tensor):
        y, d = act.value_and_slope(x, *theta)
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
        grad_x = None
        if grad_y is not None:
            grad_x = grad_y if d is None else grad_y * d
        if grad_d is not None:
            curvature = act.d2f(x, *theta)
            if curvature is not None:
                term = grad_d * curvature
                grad_x = term if grad_x is None else grad_x + term
        grad_theta = (act.parameter_gradients(x, tuple(theta), grad_y, grad_d) if any(ctx.needs_input_grad[2:])
                      else tuple(None for _ in theta))
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

    def value_slope_curvature(self, x):
        y = F.elu(x)
        slope = (y + 1.0).clamp_(max=1.0)  # e^x = f + 1 for x < 0
        return y, slope, slope.masked_fill(x > 0, 0.0)

    def value_and_slope(self, x):
        y = F.elu(x)
        return y, (y + 1.0).clamp_(max=1.0)


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


def _add_beta(module: nn.Module, beta: float, learnable: bool) -> None:
    """``raw_beta`` with ``softplus(raw_beta) = beta``: a parameter, or a buffer when fixed (never a
    parameter without a gradient: DDP)."""
    if beta <= 0:
        raise ValueError(f"LipSwish beta must be positive, got {beta}")
    raw = torch.tensor(_inverse_softplus(beta))
    if learnable:
        module.raw_beta = nn.Parameter(raw)
    else:
        module.register_buffer("raw_beta", raw)


def _host(t: Tensor):
    """A 0-dim CPU tensor as a Python number (scalar ops then cost no dispatch); else as is."""
    return float(t) if t.device.type == "cpu" and t.dim() == 0 else t


def _dot(a: Tensor, b: Tensor) -> Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


@register("activation", "lipswish",
          description="LipSwish x*sigmoid(beta x)/1.1, learnable beta > 0 (Residual Flows): 1-Lipschitz, "
                      "derivative not saturating at 1")
class LipSwish(ElementwiseActivation):
    """``f = x s / K`` with ``s = sigmoid(beta x)``, ``K = 1.1``; with ``z = beta x``::

        f'  = s (1 + z (1 - s)) / K
        f'' = beta s (1 - s) (2 + z (1 - 2 s)) / K
        df/dbeta = (x f' - f) / beta,   df'/dbeta = x f'' / beta

    ``beta = softplus(raw)`` keeps it positive (so the 1/1.1 bound holds) while learnable.
    """

    def __init__(self, beta: float = 1.0, learnable: bool = True):
        super().__init__()
        _add_beta(self, beta, learnable)

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.raw_beta)

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

    # The hooks below compute the same formulas in fewer passes (shared sigmoid, in place).
    def value_and_slope(self, x, beta):
        y, slope, _ = self._value_slope_sigmoid(x, beta)
        return y, slope

    def value_slope_curvature(self, x, beta):
        y, slope, s = self._value_slope_sigmoid(x, beta)
        b = _host(beta)
        b2k = b * b / LIPSWISH_SCALE
        # f'' = s (1 - s) (2 b / K + b^2 x (1 - 2 s) / K)
        curvature = torch.mul(s, -2.0 * b2k).add_(b2k).mul_(x).add_(2.0 * b / LIPSWISH_SCALE)
        curvature.mul_(s).addcmul_(curvature, s, value=-1.0)
        return y, slope, curvature

    @staticmethod
    def _value_slope_sigmoid(x, beta):
        b = _host(beta)
        slope = x * b
        s = torch.sigmoid(slope)
        y = x * s
        y.mul_(1.0 / LIPSWISH_SCALE)
        # f' = s / K + beta f (1 - s)
        torch.neg(s, out=slope).add_(1.0).mul_(y).mul_(b).add_(s, alpha=1.0 / LIPSWISH_SCALE)
        return y, slope, s

    def parameter_gradients(self, x, theta, grad_y, grad_d, curvature_term=None):
        (beta,) = theta
        if torch.is_grad_enabled():  # differentiable: the formulas as written
            return super().parameter_gradients(x, theta, grad_y, grad_d, curvature_term)
        b = _host(beta)
        total = None
        if grad_y is not None:  # sum grad_y (x f' - f) / beta
            y, slope = self.value_and_slope(x, beta)
            total = (_dot(grad_y * slope, x) - _dot(grad_y, y)) / b
        if grad_d is not None or curvature_term is not None:  # sum grad_d x f'' / beta
            if curvature_term is None:
                curvature_term = grad_d * self.d2f(x, beta)
            part = _dot(curvature_term, x) / b
            total = part if total is None else total + part
        return (None if total is None else total.reshape(beta.shape),)


@register("activation", "clipswish",
          description="CLipSwish [LipSwish(x), LipSwish(-x)]/1.004 (i-DenseNets): 1-Lipschitz, doubles the width")
class CLipSwish(Activation):
    """Concatenating ``f(x)`` and ``f(-x)`` keeps information a single swish squashes. Not
    elementwise (the Jacobian stacks two diagonals), so the estimators use autograd for it."""

    width_factor = 2

    def __init__(self, beta: float = 1.0, learnable: bool = True):
        super().__init__()
        _add_beta(self, beta, learnable)

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, x: Tensor) -> Tensor:
        beta = self.beta
        return torch.cat([lipswish(x, beta), lipswish(-x, beta)], dim=1) / CLIPSWISH_SCALE
