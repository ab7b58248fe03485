"""Activations for contractive residual branches (kind ``activation``).

Each declares ``lipschitz`` (its Lipschitz constant, used by ``g``'s
certified bound) and ``width_factor`` (how many times wider its output is
than its input: CLipSwish concatenates two halves). All act on dim 1, so they
serve ``[B, D]`` vectors and ``[B, C, H, W]`` feature maps alike.

Elementwise activations (``elementwise = True``) also give their derivative:
``forward_and_derivative(x) -> (f(x), f'(x))``, both differentiable (w.r.t. ``x``
and the activation's own parameters). Their Jacobian is ``diag(f'(x))``, so the
log-det estimators form Jacobian products of a whole residual function from
these factors directly (see :mod:`iresflow.nn.logdet`) instead of through
autograd's generic double backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.registry import register

__all__ = ["ELU", "LipSwish", "CLipSwish", "Softplus", "ReLU", "Identity", "lipswish"]

# max_x d/dx [x sigmoid(beta x)] = 1.0998... for every beta > 0 (attained at
# beta x ~ 2.4); dividing by 1.1 makes LipSwish 1-Lipschitz.
LIPSWISH_SCALE = 1.1
# The concatenation [f(x), f(-x)] of CLipSwish has Jacobian norm up to 1.004
# times that of f (Residual Flows' CLipSwish constant).
CLIPSWISH_SCALE = 1.004


class _Activation(nn.Module):
    lipschitz: float = 1.0
    width_factor: int = 1
    #: ``f`` acts on each entry alone (Jacobian ``diag(f'(x))``) and provides
    #: :meth:`forward_and_derivative`.
    elementwise: bool = False

    def forward_and_derivative(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(f(x), f'(x))`` for an elementwise ``f``; ``f'(x) = None`` means 1 everywhere."""
        raise NotImplementedError(f"{type(self).__name__} is not elementwise")

    # -- closed forms without autograd ------------------------------------------------
    # The memory-efficient log-det estimator evaluates a chain of linear maps and
    # elementwise activations by hand (no autograd graph, see iresflow.nn.logdet).
    # It needs, besides f and f', the gradient of <a, f(x)> + <b, f'(x)> w.r.t. x and
    # the activation's parameters -- the terms with f'' are the second-order part of
    # the Neumann log-det gradient. An elementwise activation that provides the three
    # methods below (``closed_form = True``) takes that path; any other one is handled
    # by autograd.
    closed_form: bool = False

    def closed_form_params(self) -> list[torch.Tensor]:
        """The tensors ``f`` depends on besides ``x``, differentiable w.r.t. the module's
        parameters (LipSwish: ``[beta]``); their gradients are returned in this order."""
        return []

    def value_and_derivative(self, x: torch.Tensor, *params: torch.Tensor):
        """``(f(x), f'(x) or None, state)`` computed without a graph."""
        raise NotImplementedError

    def derivative_backward(self, state, grad_y, grad_d, *params, need_params: bool = True):
        """Gradients of ``<grad_y, f(x)> + <grad_d, f'(x)>`` w.r.t. ``x`` and ``params``
        (``grad_y`` or ``grad_d`` may be None; ``grad_d`` may be a pair of tensors whose
        product it is, sparing the caller a temporary) -> ``(grad_x, [grad_param, ...])``."""
        raise NotImplementedError

    def backward_state(self, state):
        """The part of ``state`` that :meth:`derivative_backward` needs when ``grad_d`` is None
        (what is kept until the backward pass)."""
        return state


@register("activation", "elu", description="ELU (alpha=1): smooth, 1-Lipschitz (the i-ResNet paper's choice)")
class ELU(_Activation):
    elementwise = True
    closed_form = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x)

    def forward_and_derivative(self, x):
        y = F.elu(x)
        # f' = 1 for x > 0 and e^x = f(x) + 1 <= 1 otherwise (its gradient is f'' there).
        return y, (y + 1.0).clamp(max=1.0)

    def value_and_derivative(self, x):
        y, d = self.forward_and_derivative(x)
        return y, d, (x, d)

    def derivative_backward(self, state, grad_y, grad_d, need_params=True):
        x, d = state
        gx = None if grad_y is None else grad_y * d
        if grad_d is not None:  # f'' = e^x = f' for x < 0, 0 for x > 0
            t = _times(grad_d, d).masked_fill_(x > 0, 0.0)
            gx = t if gx is None else gx.add_(t)
        return gx, []

    def backward_state(self, state):
        return None, state[1]


def lipswish(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(beta x) / 1.1``: 1-Lipschitz for every ``beta > 0``."""
    return x * torch.sigmoid(beta * x) / LIPSWISH_SCALE


# LipSwish in closed form. With z = beta x, s = sigmoid(z) and K = 1.1:
#   f = x s / K,   f' = s (1 + z (1 - s)) / K,   f'' = beta s (1 - s) (2 + z (1 - 2 s)) / K,
#   df/dbeta = x^2 s (1 - s) / K = (x f' - f) / beta,   df'/dbeta = x f'' / beta.

def _host(t: torch.Tensor):
    """A 0-dim CPU tensor as a Python number (scalar ops then cost no dispatch); else as is."""
    return float(t) if t.device.type == "cpu" else t


def _lipswish_value_and_derivative(x, beta):
    """``(f, f', s)`` without a graph, in few passes (f' = s / K + beta f (1 - s))."""
    beta = _host(beta)
    d = x * beta
    s = torch.sigmoid(d)
    y = x * s
    y.mul_(1.0 / LIPSWISH_SCALE)
    torch.neg(s, out=d).add_(1.0).mul_(y).mul_(beta).add_(s, alpha=1.0 / LIPSWISH_SCALE)
    return y, d, s


def _lipswish_backward(x, beta, s, y, d, grad_y, grad_d, need_beta):
    """Gradients of ``<grad_y, f> + <grad_d, f'>`` w.r.t. x and beta. ``s`` is needed
    only with ``grad_d``; ``y`` and ``d`` only with ``grad_y`` (either may be None).
    Differentiable when grad mode is on; without it, in place where it can be."""
    k = 1.0 / LIPSWISH_SCALE
    shape = beta.shape
    if torch.is_grad_enabled():
        if isinstance(grad_d, tuple):
            grad_d = grad_d[0] * grad_d[1]
        gx = gb = None
        if grad_y is not None:
            gx = grad_y * d
            if need_beta:
                gb = (grad_y * (x * d - y)).sum() / beta
        if grad_d is not None:
            t = grad_d * s * (1.0 - s) * (2.0 + x * beta * (1.0 - 2.0 * s)) * k  # grad_d f'' / beta
            gx = t * beta if gx is None else gx + t * beta
            if need_beta:
                gb = (t * x).sum() if gb is None else gb + (t * x).sum()
        return gx, (None if gb is None else gb.reshape(beta.shape))
    beta = _host(beta)
    gx = gb = None
    if grad_y is not None:
        gx = grad_y * d
        if need_beta:  # sum grad_y df/dbeta = (<grad_y f', x> - <grad_y, f>) / beta
            gb = (_flat_dot(gx, x) - _flat_dot(grad_y, y)) / beta
    if grad_d is not None:
        # e = grad_d f'' = grad_d s (1 - s) (2 b/K + b^2 x (1 - 2 s) / K), b = beta
        b2k = beta * beta * k
        e = torch.mul(s, b2k * -2.0).add_(b2k).mul_(x).add_(beta * (2.0 * k))
        e.mul_(s).addcmul_(e, s, value=-1.0)
        for factor in (grad_d if isinstance(grad_d, tuple) else (grad_d,)):
            e.mul_(factor)
        if need_beta:  # sum grad_d df'/dbeta = sum grad_d x f'' / beta
            g2 = _flat_dot(e, x) / beta
            gb = g2 if gb is None else gb + g2
        gx = e if gx is None else gx.add_(e)
    return gx, (None if gb is None else gb.reshape(shape))


def _times(factors, t: torch.Tensor) -> torch.Tensor:
    """``prod(factors) * t`` in a new tensor (``factors``: a tensor or a tuple of them)."""
    if not isinstance(factors, tuple):
        return factors * t
    out = factors[0] * t
    for f in factors[1:]:
        out.mul_(f)
    return out


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype != b.dtype:
        dt = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dt), b.to(dt)
    return torch.dot(a.reshape(-1), b.reshape(-1))


class _LipSwishWithDerivative(torch.autograd.Function):
    """``(f(x), f'(x))`` of ``f(x) = x sigmoid(beta x) / 1.1`` in one pass, with a hand-written
    backward (the second derivative in closed form, a fraction of autograd's elementwise ops).
    The backward is made of torch ops (and recomputes ``s`` from ``x`` and ``beta`` when it
    is itself differentiated), so it can be differentiated again.
    """

    @staticmethod
    def forward(ctx, x, beta):
        y, d, s = _lipswish_value_and_derivative(x, beta)
        ctx.save_for_backward(x, beta, s)
        return y, d

    @staticmethod
    def backward(ctx, grad_y, grad_d):
        x, beta, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # a differentiable backward: everything as functions of x, beta
            z = x * beta
            s = torch.sigmoid(z)
            y = x * s / LIPSWISH_SCALE
            d = (s + z * s * (1.0 - s)) / LIPSWISH_SCALE
        else:
            y = x * s / LIPSWISH_SCALE
            d = (1.0 - s).mul_(y).mul_(beta).add_(s, alpha=1.0 / LIPSWISH_SCALE)
        return _lipswish_backward(x, beta, s, y, d, grad_y, grad_d, ctx.needs_input_grad[1])


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


@register("activation", "lipswish",
          description="LipSwish x*sigmoid(beta x)/1.1, learnable beta > 0 (Residual Flows): 1-Lipschitz, "
                      "derivative not saturating at 1")
class LipSwish(_Activation):
    """``beta = softplus(raw)`` keeps it positive (so the 1/1.1 bound holds) while learnable."""

    elementwise = True
    closed_form = True

    def __init__(self, beta: float = 1.0, learnable: bool = True):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"LipSwish beta must be positive, got {beta}")
        raw = torch.tensor(_inverse_softplus(beta))
        if learnable:
            self.raw_beta = nn.Parameter(raw)
        else:  # a buffer, never a parameter without a gradient (DDP)
            self.register_buffer("raw_beta", raw)

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lipswish(x, self.beta)

    def forward_and_derivative(self, x):
        return _LipSwishWithDerivative.apply(x, self.beta)

    def closed_form_params(self):
        return [self.beta]

    def value_and_derivative(self, x, beta):
        y, d, s = _lipswish_value_and_derivative(x, beta)
        return y, d, (x, s, y, d)

    def derivative_backward(self, state, grad_y, grad_d, beta, need_params=True):
        x, s, y, d = state
        gx, gb = _lipswish_backward(x, beta, s, y, d, grad_y, grad_d, need_params)
        return gx, [gb]

    def backward_state(self, state):
        x, s, y, d = state
        # The beta gradient needs x, f (kept anyway: the next layer's input) and f'.
        return (x, None, y, d) if self.raw_beta.requires_grad else (None, None, None, d)


@register("activation", "clipswish",
          description="CLipSwish [LipSwish(x), LipSwish(-x)]/1.004 (i-DenseNets): 1-Lipschitz, doubles the width")
class CLipSwish(LipSwish):
    """Concatenating ``f(x)`` and ``f(-x)`` keeps information a single swish squashes."""

    width_factor = 2
    elementwise = False  # the concatenation mixes x and -x: not a diagonal Jacobian

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta
        return torch.cat([lipswish(x, beta), lipswish(-x, beta)], dim=1) / CLIPSWISH_SCALE


@register("activation", "softplus", description="softplus log(1+e^x): 1-Lipschitz, smooth")
class Softplus(_Activation):
    elementwise = True
    closed_form = True

    def value_and_derivative(self, x):
        d = torch.sigmoid(x)
        return F.softplus(x), d, (d,)

    def derivative_backward(self, state, grad_y, grad_d, need_params=True):
        (d,) = state
        gx = None if grad_y is None else grad_y * d
        if grad_d is not None:  # f'' = d (1 - d)
            t = _times(grad_d, d).mul_(1.0 - d)
            gx = t if gx is None else gx.add_(t)
        return gx, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)

    def forward_and_derivative(self, x):
        return F.softplus(x), torch.sigmoid(x)


@register("activation", "relu", description="ReLU: 1-Lipschitz but not smooth (the log-det series needs C1; "
                                            "for classification only)")
class ReLU(_Activation):
    elementwise = True
    closed_form = True

    def value_and_derivative(self, x):
        d = (x > 0).to(x.dtype)
        return F.relu(x), d, (d,)

    def derivative_backward(self, state, grad_y, grad_d, need_params=True):
        return (None if grad_y is None else grad_y * state[0]), []  # f'' = 0 (almost everywhere)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def forward_and_derivative(self, x):
        return F.relu(x), (x > 0).to(x.dtype)


@register("activation", "identity", description="identity (a linear g; for tests and ablations)")
class Identity(_Activation):
    elementwise = True
    closed_form = True

    def value_and_derivative(self, x):
        return x, None, ()

    def derivative_backward(self, state, grad_y, grad_d, need_params=True):
        return grad_y, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_and_derivative(self, x):
        return x, None
