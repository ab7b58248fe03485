"""Log-determinant estimators for ``F(x) = x + g(x)``: ``log|det(I + J_g(x))|`` per sample.

For ``Lip(g) < 1``::

    log|det(I + J)| = tr log(I + J) = sum_{k>=1} (-1)^(k+1) tr(J^k) / k

Traces come from Hutchinson's estimator ``tr(A) = E[v^T A v]`` (``E[v v^T] = I``),
and ``v^T J^k`` from ``k`` repeated vector-Jacobian products of the one
evaluation ``g(x)``. Estimators differ in how many terms they keep:

* ``exact``: the full per-sample Jacobian and ``slogdet`` (small inputs only);
* ``power_series``: the first ``n_terms`` terms (biased, error ~ Lip^n / n);
* ``russian_roulette``: ``n_terms + N`` terms, ``N`` random, term ``k``
  divided by the probability that it is included, so the estimate is unbiased.

Gradient modes (the ``gradient`` constructor argument):

* ``backprop``: differentiate through the series (graph of every vjp; memory
  linear in the number of terms);
* ``neumann``: the value is computed without a graph; the gradient comes from
  ``d log det(I+J) = tr((I+J)^{-1} dJ) = sum_{k>=0} (-1)^k tr(J^k dJ)``, realised
  as the surrogate ``u^T J v`` with ``u = sum_{k=0}^{n} (-1)^k c_k v^T J^k``
  held constant (one vjp with a graph; memory constant in n);
* ``memory_efficient``: the Neumann gradient computed already in the forward
  pass (backward-in-forward), so only ``g``'s own graph and the finished
  gradients are kept until backward.

Jacobian products. For a generic ``g`` every ``w^T J`` is an autograd
vector-Jacobian product of the one evaluation ``g(x)``. When ``g`` is a plain
chain of linear maps and elementwise activations (``g.linear_chain()``, true
of the built-in residual functions), ``J = W_L D_{L-1} ... D_1 W_1`` is applied
from its factors -- the weights and the activations' derivatives, kept from
the one evaluation -- with plain matrix products (transposed convolutions for
conv layers): the same numbers without autograd's generic machinery, and the
gradients through them (backprop, the Neumann surrogate) without a double
backward through every elementwise op of ``g``.

Precision. Under ``torch.autocast`` (e.g. bfloat16) ``g`` and its Jacobian
products may run in low precision, but every ``w^T v`` is cast to float32
(at least) before it is summed: the series and the returned log-det are
accumulated in float32.

The truncated Neumann gradient uses every vjp already computed for the value
(``k = 0..n``), so with exact traces it equals the backprop gradient of the
``(n+1)``-term series; with Russian roulette term ``k`` carries the same
weight ``1/P(term k included)`` in value and gradient, keeping both unbiased.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.nn.lipschitz import _conv_forward, _conv_input_grad, _conv_kind, _conv_weight_grad
from iresflow.registry import register

__all__ = [
    "LogDetEstimator",
    "ExactLogDet",
    "PowerSeriesLogDet",
    "RussianRouletteLogDet",
    "sample_probes",
    "GRADIENT_MODES",
]

GRADIENT_MODES = ("backprop", "neumann", "memory_efficient")
PROBES = ("gaussian", "rademacher")


def sample_probes(x: torch.Tensor, n_probes: int, kind: str = "gaussian") -> torch.Tensor:
    """``n_probes`` Hutchinson probes shaped ``[n_probes, *x.shape]`` with ``E[v v^T] = I``."""
    shape = (n_probes, *x.shape)
    if kind == "gaussian":
        return torch.randn(shape, dtype=x.dtype, device=x.device)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, device=x.device).to(x.dtype) * 2 - 1
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype: the widest of ``dtypes`` and float32 (never below float32)."""
    acc = torch.float32
    for dt in dtypes:
        if dt != acc:
            acc = torch.promote_types(acc, dt)
    return acc


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner product of two ``[rows, ...]`` tensors, in float32 or wider.

    Under autocast ``a`` (a Jacobian product) may be bfloat16: the products and
    their sum are formed in the accumulation dtype, never in bfloat16.
    """
    acc = _acc_dtype(a.dtype, b.dtype)
    return (a.to(acc) * b.to(acc)).reshape(a.shape[0], -1).sum(1)


def _vjp(gx: torch.Tensor, x: torch.Tensor, w: torch.Tensor, create_graph: bool) -> torch.Tensor:
    # Samples are independent, so one vjp of the batch gives w_b^T J_b for every b.
    return torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)[0]


class LogDetEstimator(nn.Module):
    """Base class: ``estimator(g, x) -> (g(x), logdet[B])``.

    ``forward`` also accepts ``probes`` (``[P, *x.shape]`` or ``x.shape``) to fix
    the Hutchinson vectors, e.g. for tests or variance studies.
    """

    gradient_modes: tuple[str, ...] = GRADIENT_MODES

    def __init__(self, gradient: str = "backprop"):
        super().__init__()
        if gradient not in self.gradient_modes:
            raise ValueError(f"{type(self).__name__}: unknown gradient mode {gradient!r}; "
                             f"expected one of {self.gradient_modes}")
        self.gradient = gradient
        self.last_n_terms: int = 0

    def extra_repr(self) -> str:
        return f"gradient={self.gradient!r}"


# --------------------------------------------------------------------------- exact


@register("estimator", "exact")
class ExactLogDet(LogDetEstimator):
    """Exact ``log|det(I + J_g)|`` from the full per-sample Jacobian (small inputs only).

    There is no series, so every gradient mode means the same thing: the exact
    gradient of ``slogdet`` by backprop. All modes are accepted, so that an
    ablation can switch ``model.estimator.name=exact`` without touching ``gradient``.
    """

    max_numel = 4096

    def __init__(self, gradient: str = "backprop"):
        super().__init__(gradient)

    def forward(self, g: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = x[0].numel()
        if d > self.max_numel:
            raise ValueError(f"exact log-det needs the full Jacobian; {d} features per sample "
                             f"exceeds the limit of {self.max_numel}")
        grad = torch.is_grad_enabled()
        with torch.enable_grad():
            xx = x if (grad and x.requires_grad) else x.detach().requires_grad_()
            gx = g(xx)
            jac = self._jacobian(gx, xx, create_graph=grad)  # [B, d, d]
        eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
        logdet = torch.linalg.slogdet(eye + jac).logabsdet
        self.last_n_terms = d
        if not grad:
            return gx.detach(), logdet.detach()
        return gx, logdet

    @staticmethod
    def _jacobian(gx: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """``J[b, i, j] = d g(x)_{b,i} / d x_{b,j}`` from d vjps of the one evaluation."""
        b, d = x.shape[0], x[0].numel()
        basis = torch.eye(d, dtype=gx.dtype, device=gx.device)
        outs = basis[:, None, :].expand(d, b, d).reshape(d, *gx.shape)
        try:
            rows = torch.autograd.grad(gx, x, outs, create_graph=create_graph,
                                       retain_graph=True, is_grads_batched=True)[0]
        except RuntimeError:  # an op without a batching rule: one vjp per output
            rows = torch.stack([_vjp(gx, x, o, create_graph) for o in outs])
        return rows.reshape(d, b, d).transpose(0, 1)


# --------------------------------------------------------------------------- series


class _SeriesLogDet(LogDetEstimator):
    """Shared machinery of the series estimators: probes, vjps, gradient modes.

    Subclasses choose the number of terms ``n`` and the weight ``c_k`` of term
    ``k`` (``k = 0`` is used only by the Neumann gradient series).
    """

    def __init__(self, n_probes: int = 1, probe: str = "gaussian", gradient: str = "backprop"):
        super().__init__(gradient)
        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        if probe not in PROBES:
            raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
        self.n_probes = int(n_probes)
        self.probe = probe

    # Subclass hooks -------------------------------------------------------
    def _plan(self) -> tuple[int, list[float]]:
        """``(n, [c_0, ..., c_n])``: number of terms and per-term weights."""
        raise NotImplementedError

    # ----------------------------------------------------------------------
    def forward(self, g: nn.Module, x: torch.Tensor, probes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n, weights = self._plan()
        self.last_n_terms = n
        if probes is None:
            probes = sample_probes(x, self.n_probes, self.probe)
        elif probes.shape == x.shape:
            probes = probes.unsqueeze(0)
        if probes.shape[1:] != x.shape:
            raise ValueError(f"probes must have shape [P, *{tuple(x.shape)}], got {tuple(probes.shape)}")

        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in g.parameters()))
        if not needs_grad:
            with torch.enable_grad():
                xx = x.detach().requires_grad_()
                gx, jac, v, p = _evaluate(g, xx, probes)
                value, _ = _series(jac, v, p, n, weights, create_graph=False, neumann=False)
            return gx.detach(), value.detach()

        if self.gradient == "memory_efficient":
            chain = _ManualChain.of(g, x)
            if chain is not None:
                return _ManualBackwardInForward.apply(chain, probes, n, weights, x, *chain.params)
            params = [p for p in g.parameters() if p.requires_grad]
            gx, logdet = _BackwardInForward.apply(g, probes, n, weights, x, *params)
            return gx, logdet

        # Differentiate w.r.t. x itself when it carries a graph, else a fresh leaf
        # (the gradients then only reach g's parameters, which is all there is).
        xx = x if x.requires_grad else x.detach().requires_grad_()
        gx, jac, v, p = _evaluate(g, xx, probes)
        if self.gradient == "backprop":
            logdet, _ = _series(jac, v, p, n, weights, create_graph=True, neumann=False)
            return gx, logdet
        value, u = _series(jac, v, p, n, weights, create_graph=False, neumann=True)
        s = _surrogate(jac, u, v, p, create_graph=True)
        return gx, value + (s - s.detach())


class _AutogradJacobian:
    """``w^T J`` by autograd: vector-Jacobian products of the one evaluation ``g(x)``."""

    def __init__(self, g: nn.Module, x: torch.Tensor):
        self.x = x
        self.out = g(x)

    def vjp(self, w: torch.Tensor, create_graph: bool) -> torch.Tensor:
        return _vjp(self.out, self.x, w, create_graph)

    def release(self) -> None:
        """Nothing beyond ``g``'s own graph is held."""


class _ChainJacobian:
    """``g = f_L o ... o f_1`` evaluated layer by layer, keeping each layer's Jacobian
    factor: the (normalised) weight of a linear map, ``f'(x)`` of an activation.

    ``w^T J = w^T W_L D_{L-1} ... D_1 W_1`` is then a few matrix products (transposed
    convolutions for conv layers) and elementwise scalings. Without ``create_graph``
    the detached factors are used (no graph at all); with it the factors carry their
    graph, so autograd differentiates ``w^T J`` w.r.t. the weights and, through
    ``f'(x)``, w.r.t. ``x`` and every earlier parameter -- the second-order terms
    that a double backward through ``g`` would form, from closed-form ``f''``.
    """

    LINEAR, CONV, SCALE = 0, 1, 2

    def __init__(self, layers: list[nn.Module], x: torch.Tensor):
        self.x = x
        h = x
        ops = []
        for m in layers:
            if isinstance(m, nn.Linear):
                w = m.weight_for(h) if hasattr(m, "weight_for") else m.weight
                h = F.linear(h, w, m.bias)
                ops.append((self.LINEAR, m, w, None))
            elif isinstance(m, nn.Conv2d):
                w = m.weight_for(h) if hasattr(m, "weight_for") else m.weight
                size = tuple(h.shape[-2:])
                h = F.conv2d(h, w, m.bias, m.stride, m.padding, m.dilation)
                ops.append((self.CONV, m, w, self._output_padding(m, size, h.shape[-2:])))
            else:
                h, d = m.forward_and_derivative(h)
                if d is not None:
                    ops.append((self.SCALE, m, d, None))
        self.out = h
        self.ops = ops[::-1]  # in the order a vjp applies them
        self.detached = [(k, m, f.detach(), e) for k, m, f, e in self.ops]

    @staticmethod
    def _output_padding(m: nn.Conv2d, size, out_size) -> tuple[int, int]:
        # conv_transpose2d must restore the input size (a strided conv drops rows/columns).
        return tuple(int(size[i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1
                         - (out_size[i] - 1) * m.stride[i]) for i in range(2))

    def vjp(self, w: torch.Tensor, create_graph: bool) -> torch.Tensor:
        for kind, m, f, extra in (self.ops if create_graph else self.detached):
            if kind == self.LINEAR:
                w = w @ f
            elif kind == self.CONV:
                w = F.conv_transpose2d(w, f, None, m.stride, m.padding, extra, 1, m.dilation)
            else:
                w = w * f
        return w

    def release(self) -> None:
        """Drop the factors; ``out`` keeps ``g``'s own graph for the backward of ``g(x)``."""
        self.ops = self.detached = []


def _evaluate(g, x, probes):
    """Evaluate g once. With P > 1 probes g runs on the batch repeated P times, so a
    single vjp chain serves all probes. Returns ``g(x)`` (the first copy), the
    Jacobian-product object, the flattened probes and P."""
    p = probes.shape[0]
    xr = x if p == 1 else x.repeat(p, *([1] * (x.dim() - 1)))
    chain = getattr(g, "linear_chain", None)
    layers = chain() if callable(chain) else None
    jac = _ChainJacobian(layers, xr) if layers else _AutogradJacobian(g, xr)
    v = probes.reshape(p * x.shape[0], *x.shape[1:])
    return jac.out[: x.shape[0]], jac, v, p


def _series(jac, v, p, n, weights, create_graph, neumann):
    """Value ``sum_{k=1}^n c_k (-1)^(k+1)/k v^T J^k v`` (averaged over probes) and,
    if ``neumann``, the detached Neumann vector ``u = sum_{k=0}^n (-1)^k c_k v^T J^k``.
    Only the current ``w = v^T J^k`` is kept, so without a graph memory is O(1) in n.
    The terms are accumulated in float32 or wider (see :func:`_dot`)."""
    w = v
    total = v.new_zeros(v.shape[0], dtype=_acc_dtype(v.dtype))
    u = weights[0] * v.to(total.dtype) if neumann else None
    for k in range(1, n + 1):
        w = jac.vjp(w, create_graph)
        sign = 1.0 if k % 2 == 1 else -1.0
        total = total + (sign * weights[k] / k) * _dot(w, v)
        if neumann:
            u = u - sign * weights[k] * w.detach()
    value = total.view(p, -1).mean(0)
    return value, (u.detach() if neumann else None)


def _surrogate(jac, u, v, p, create_graph):
    """Per-sample ``mean_p u_p^T J v_p``; its gradient is the Neumann log-det gradient."""
    s = _dot(jac.vjp(u, create_graph), v)
    return s.view(p, -1).mean(0)


class _BackwardInForward(torch.autograd.Function):
    """Memory-efficient log-det: the Neumann gradient is formed inside the forward.

    Forward evaluates g once, the log-det value without a graph, and the
    gradients of the Neumann surrogate w.r.t. x and g's parameters, then frees
    that second-order graph. Only g's first-order graph (needed for the gradient
    through g(x)) and the finished gradients survive until backward, which scales
    them by the incoming gradient of the log-det.

    Samples are independent, so the x-gradient is exact per sample for any
    upstream gradient; the parameter gradient was formed for equal weights on
    all samples (the usual mean loss). If the upstream log-det gradient is not
    the same for all samples, backward rebuilds the surrogate once from the
    saved Neumann vector with the right per-sample weights (by autograd through
    g's first-order graph).
    """

    @staticmethod
    def forward(ctx, g, probes, n, weights, x, *params):
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            gx, jac, v, p = _evaluate(g, xx, probes)
            value, u = _series(jac, v, p, n, weights, create_graph=False, neumann=True)
            s = _surrogate(jac, u, v, p, create_graph=True)
            grads = torch.autograd.grad(s.sum(), [xx, *params], retain_graph=True,
                                        allow_unused=True)
            del s
            jac.release()
        # Keep g's first-order graph for the vjp of g(x) in backward.
        ctx.gx, ctx.gxr, ctx.xx, ctx.xr, ctx.p = gx, jac.out, xx, jac.x, p
        ctx.n_params = len(params)
        ctx.unused = [t is None for t in grads]
        ctx.save_for_backward(u, v, *[t for t in grads if t is not None])
        ctx.params = params
        return gx.detach(), value.detach()

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):
        u, v, *saved = ctx.saved_tensors
        it = iter(saved)
        grads = [None if unused else next(it) for unused in ctx.unused]
        gx, gxr, xx, xr, params = ctx.gx, ctx.gxr, ctx.xx, ctx.xr, ctx.params
        inputs = [xx, *params]
        uniform = bool((grad_logdet == grad_logdet[0]).all())

        with torch.enable_grad():
            dg = torch.autograd.grad(gx, inputs, grad_gx, retain_graph=not uniform,
                                     allow_unused=True)
            if not uniform:
                # Per-sample weights on the parameter gradient: rebuild the surrogate.
                s = _dot(_vjp(gxr, xr, u, create_graph=True), v).view(ctx.p, -1).mean(0)
                grads = list(torch.autograd.grad((s * grad_logdet).sum(), inputs,
                                                 allow_unused=True))
        ctx.gx = ctx.gxr = ctx.xx = ctx.xr = ctx.params = None

        out = []
        for i, (a, b) in enumerate(zip(dg, grads)):
            if b is not None and uniform:
                if i == 0:  # x: per-sample scaling is exact
                    b = b * grad_logdet.view(-1, *([1] * (b.dim() - 1)))
                else:
                    b = b * grad_logdet[0]
            if a is None:
                out.append(b)
            else:
                out.append(a if b is None else a + b)
        dx, *dparams = out
        return (None, None, None, None, dx, *dparams)


# --------------------------------------------------------------------------- by hand

_LIN, _CONV, _ACT = 0, 1, 2


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D). A product with only a few columns is formed transposed: BLAS
    runs e.g. ``[512, 128] @ [128, 2]`` several times faster as ``([2, 128] @ [128, 512])^T``."""
    if b.shape[1] <= 8 < a.shape[0]:
        return (b.t() @ a.t()).t()
    return a @ b


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class _ManualState:
    """One evaluation of a :class:`_ManualChain`: each layer's input and each
    activation's ``(f', state)``; ``vjp`` applies ``J^T`` from these factors."""

    def __init__(self, chain: "_ManualChain", x: torch.Tensor, params):
        self.chain, self.x, self.params = chain, x, params
        self.inputs: list[torch.Tensor | None] = []
        self.acts: dict[int, tuple] = {}
        h = x
        for i, (kind, m, idx, bidx, extra) in enumerate(chain.records):
            self.inputs.append(h)
            if kind == _LIN:
                h = F.linear(h, params[idx], None if bidx is None else params[bidx])
            elif kind == _CONV:
                h = _conv_forward(extra[1], m, h, params[idx], None if bidx is None else params[bidx])
            else:
                h, d, state = m.value_and_derivative(h, *[params[j] for j in idx])
                self.acts[i] = (d, state)
        self.out = h

    def vjp(self, w: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``w^T J`` (there is no graph here: ``create_graph`` is ignored)."""
        params, owned = self.params, False
        for i in range(len(self.chain.records) - 1, -1, -1):
            kind, m, idx, _, extra = self.chain.records[i]
            if kind == _LIN:
                w, owned = _mm(w, params[idx]), True
            elif kind == _CONV:
                w, owned = _conv_input_grad(extra[1], m, w, params[idx], None, extra[0]), True
            else:
                d = self.acts[i][0]
                if d is not None:
                    w = w.mul_(d) if owned else w * d
                    owned = True
        return w

    def keep_for_backward(self) -> None:
        """Drop what the backward of ``g(x)`` does not need (activation inputs, second-order state)."""
        for i, (d, state) in self.acts.items():
            self.inputs[i] = None
            self.acts[i] = (d, self.chain.records[i][1].backward_state(state))
        self.out = None


# Inputs [B, D] with D at most this (and at most the number of series terms) use the
# materialised Jacobian: D forward-mode passes instead of n + 1.
_DENSE_JACOBIAN_MAX_DIM = 8


class _DenseJacobian:
    """``w^T J`` from a materialised per-sample Jacobian ``[B, D, D]``."""

    def __init__(self, jac: torch.Tensor):
        self.jac = jac

    def vjp(self, w: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        return torch.bmm(w.unsqueeze(1), self.jac.to(w.dtype) if w.dtype != self.jac.dtype else self.jac).squeeze(1)


class _ManualChain:
    """A chain ``g`` of linear maps and elementwise activations with closed-form
    derivatives (see ``ResidualFunction.linear_chain`` and the activations'
    ``closed_form``), evaluated and differentiated by hand, without autograd.

    Used by the memory-efficient estimator. The gradient of the Neumann surrogate
    ``s = sum_b u_b^T J_b v_b`` has two parts:

    * direct: for a linear map ``W``, ``c^T t`` (``t``: the tangent ``J v`` at its
      input, ``c``: the cotangent ``u^T J`` at its output); for an activation's own
      parameters, ``sum (c * t) df'/dtheta``;
    * through the network: ``s`` depends on each activation's input ``p`` through
      ``f'(p)``, with gradient ``e = (c * t) f''(p)``; ``e`` travels back to ``x``
      and every earlier parameter like any gradient of ``g``.

    The forward computes the direct part and the ``e`` of every activation and
    keeps them; the backward sends ``grad_gx`` and ``grad_logdet * e`` back through
    ``g`` in ONE pass (a second pass through ``g`` just for the surrogate, as in
    autograd's double backward, is not needed). The effective parameters
    (normalised weights, biases, activation parameters) are the autograd
    function's inputs, so autograd only differentiates the small maps from them
    to the module parameters (e.g. the spectral normalisation).
    """

    def __init__(self, layers, x: torch.Tensor):
        self.records: list[tuple] = []
        params: list[torch.Tensor] = []
        shape = tuple(x.shape)
        for m in layers:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                # weight_for runs the training-time power iterations (and, for a conv,
                # checks the input size, all it reads of its argument).
                if not hasattr(m, "weight_for"):
                    w = m.weight
                elif isinstance(m, nn.Linear):  # (the size of the input does not matter)
                    w = m.weight_for(x)
                else:
                    w = m.weight_for(x.new_empty((0, *shape[1:])))
                idx = len(params)
                params.append(w)
                bidx = None
                if m.bias is not None:
                    bidx = len(params)
                    params.append(m.bias)
                if isinstance(m, nn.Linear):
                    self.records.append((_LIN, m, idx, bidx, None))
                    shape = (*shape[:-1], m.out_features)
                else:
                    size = shape[-2:]
                    out = tuple((size[i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1)
                                // m.stride[i] + 1 for i in range(2))
                    op = _ChainJacobian._output_padding(m, size, out)
                    self.records.append((_CONV, m, idx, bidx, (op, _conv_kind(m))))
                    shape = (shape[0], m.out_channels, *out)
            else:
                ps = list(m.closed_form_params())
                self.records.append((_ACT, m, list(range(len(params), len(params) + len(ps))), None, None))
                params.extend(ps)
        self.params = params

    @classmethod
    def of(cls, g: nn.Module, x: torch.Tensor) -> "_ManualChain | None":
        """The chain for ``g`` at input ``x``, or None when ``g`` is not such a chain."""
        chain = getattr(g, "linear_chain", None)
        layers = chain() if callable(chain) else None
        if not layers:
            return None
        for m in layers:
            if isinstance(m, nn.Linear):
                if x.dim() != 2:
                    return None
            elif isinstance(m, nn.Conv2d):
                if x.dim() != 4:
                    return None
            elif not getattr(m, "closed_form", False):
                return None
        return cls(layers, x)

    def tangents(self, st: _ManualState, v: torch.Tensor, last: bool = False) -> list[torch.Tensor]:
        """The tangent ``J v`` (forward mode) at the input of every layer (and, with
        ``last``, at the output as the final entry)."""
        recs, params = self.records, st.params
        t = v
        out = []
        for i, (kind, m, idx, _, _) in enumerate(recs):
            out.append(t)
            if i == len(recs) - 1 and not last:
                break
            if kind == _LIN:
                t = F.linear(t, params[idx])
            elif kind == _CONV:
                t = _conv_forward(recs[i][4][1], m, t, params[idx], None)
            else:
                d = st.acts[i][0]
                if d is not None:
                    t = t * d
        if last:
            out.append(t)
        return out

    def jacobian(self, st: _ManualState):
        """For inputs ``[B, D]`` with small ``D``: the per-sample Jacobian ``[B, D, D]`` from
        the D forward-mode passes ``J e_j``, run together (stacked on a leading dim). Also
        returns those passes' tangents at the inputs of the layers that follow a linear
        map (the others follow from them by a product with ``f'``)."""
        recs, params, x = self.records, st.params, st.x
        b, dim = x.shape
        t = torch.eye(dim, dtype=x.dtype, device=x.device)[:, None, :].expand(dim, b, dim).contiguous()
        keep: dict[int, torch.Tensor] = {}
        for i, (kind, m, idx, _, _) in enumerate(recs):
            if i > 0 and recs[i - 1][0] != _ACT:
                keep[i] = t
            if kind == _LIN:
                t = F.linear(t, params[idx])
            else:
                d = st.acts[i][0]
                if d is not None:
                    t = t * d if i in keep else t.mul_(d)
        return t.permute(1, 2, 0), keep  # t[j, b] = J_b e_j, the column j

    def surrogate(self, st: _ManualState, u: torch.Tensor, v: torch.Tensor, need: list[bool], need_x: bool,
                  basis_tangents=None):
        """For ``s = sum_rows u^T J v``: the direct parameter gradients and, per
        activation, the gradient ``e`` w.r.t. its input (see the class notes).
        ``basis_tangents`` (from :meth:`jacobian`) give the tangents of ``v`` as
        combinations instead of a forward-mode pass."""
        recs, params = self.records, st.params
        if basis_tangents is None:
            tangents = self.tangents(st, v)
        else:  # J v = sum_j v_j (J e_j)
            tangents = []
            t = v
            for i, (kind, m, idx, _, _) in enumerate(recs):
                if i in basis_tangents:
                    ts = basis_tangents[i]
                    t = ts[0] * v[:, :1]
                    for j in range(1, ts.shape[0]):
                        t.addcmul_(ts[j], v[:, j:j + 1])
                elif i > 0:  # after an activation
                    d = st.acts[i - 1][0]
                    if d is not None:
                        t = t * d
                tangents.append(t)
        grads: list[torch.Tensor | None] = [None] * len(params)
        es: dict[int, torch.Tensor] = {}
        c, owned = u, False  # the cotangent u^T J at the current layer's output
        for i in range(len(recs) - 1, -1, -1):
            kind, m, idx, bidx, extra = recs[i]
            t_in, first = tangents[i], i == 0
            if kind == _LIN:
                if need[idx]:
                    grads[idx] = _mm(c.t(), t_in)
                if not first:
                    c, owned = _mm(c, params[idx]), True
            elif kind == _CONV:
                if need[idx]:
                    grads[idx] = _conv_weight_grad(extra[1], m, c, t_in, params[idx])
                if not first:
                    c, owned = _conv_input_grad(extra[1], m, c, params[idx], None, extra[0]), True
            else:
                d, state = st.acts[i]
                if d is None:  # identity: f' = 1, f'' = 0
                    continue
                need_p = any(need[j] for j in idx)
                if need_p or need_x or not first:
                    e, gps = m.derivative_backward(state, None, (c, t_in), *[params[j] for j in idx],
                                                   need_params=need_p)
                    es[i] = e
                    for j, gp in zip(idx, gps):
                        grads[j] = gp if need[j] else None
                if not first:
                    c = c.mul_(d) if owned else c * d
                    owned = True
        return grads, es

    def backward(self, st: _ManualState, grad: torch.Tensor, rows: int, need: list[bool], need_x: bool,
                 es: dict[int, torch.Tensor], es_scale):
        """Gradients of ``<grad, g(x)[:rows]>`` plus ``sum <es_scale * e, p>`` over the
        activations' inputs ``p`` w.r.t. ``x[:rows]`` and the parameters. ``es_scale``
        is a number or a per-row column."""
        recs, params = self.records, st.params
        full = st.x.shape[0] == rows

        def cut(t):
            return t if (t is None or full) else t[:rows]

        grads: list[torch.Tensor | None] = [None] * len(params)
        delta = grad
        for i in range(len(recs) - 1, -1, -1):
            kind, m, idx, bidx, extra = recs[i]
            go_on = i > 0 or need_x
            if kind == _LIN:
                if need[idx]:
                    grads[idx] = _mm(delta.t(), cut(st.inputs[i]))
                if bidx is not None and need[bidx]:
                    grads[bidx] = delta.sum(0)
                delta = _mm(delta, params[idx]) if go_on else None
            elif kind == _CONV:
                w = params[idx]
                if need[idx]:
                    grads[idx] = _conv_weight_grad(extra[1], m, delta, cut(st.inputs[i]), w)
                if bidx is not None and need[bidx]:
                    grads[bidx] = delta.sum((0, 2, 3))
                delta = _conv_input_grad(extra[1], m, delta, w, None, extra[0]) if go_on else None
            else:
                d, state = st.acts[i]
                if d is None:
                    continue
                state = tuple(cut(t) for t in state)
                delta, gps = m.derivative_backward(state, delta, None, *[params[j] for j in idx],
                                                   need_params=any(need[j] for j in idx))
                for j, gp in zip(idx, gps):
                    grads[j] = gp if need[j] else None
                e = es.get(i)
                if e is not None and go_on:
                    if isinstance(es_scale, torch.Tensor):
                        delta = delta.addcmul_(e, es_scale if es_scale.dim() else es_scale.to(e.dtype))
                    else:
                        delta = delta.add_(e, alpha=es_scale)
            if delta is None:
                break
        return delta, grads


class _ManualBackwardInForward(torch.autograd.Function):
    """The memory-efficient estimator for a :class:`_ManualChain` (the mathematics of
    :class:`_BackwardInForward`, by hand). The forward evaluates ``g``, the series,
    the direct surrogate gradients and each activation's ``e``; ``g``'s layer
    inputs, activation derivatives and the ``e`` are kept (all O(1) in the number
    of terms); the backward is one pass through ``g``."""

    @staticmethod
    def forward(ctx, chain, probes, n, weights, x, *params):
        p, b = probes.shape[0], x.shape[0]
        xr = x if p == 1 else x.repeat(p, *([1] * (x.dim() - 1)))
        v = probes.reshape(p * b, *x.shape[1:])
        need = list(ctx.needs_input_grad[5:])
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), dev)
        st = _ManualState(chain, xr, params)
        need_x = ctx.needs_input_grad[4]
        basis = None
        if p == 1 and x.dim() == 2 and x.shape[1] <= min(n, _DENSE_JACOBIAN_MAX_DIM):
            # Few dimensions: D forward-mode passes give the whole Jacobian, whose powers
            # then cost nothing -- D passes instead of n (vjps) + 1 (the tangent of v).
            jac, basis = chain.jacobian(st)
            value, u = _series(_DenseJacobian(jac), v, p, n, weights, create_graph=False, neumann=True)
        else:
            value, u = _series(st, v, p, n, weights, create_graph=False, neumann=True)
        grads, es = chain.surrogate(st, u / p, v, need, need_x, basis)
        del basis
        if p > 1:  # the p copies share the primal point: their e add up
            es = {i: e.reshape(p, b, *e.shape[1:]).sum(0) for i, e in es.items()}
        out = st.out if p == 1 else st.out[:b]
        st.keep_for_backward()
        # Everything the backward needs goes through save_for_backward, so that saved-tensor
        # hooks (offloading, memory accounting) see it.
        saved: list[torch.Tensor] = []

        def put(t):
            if t is None:
                return None
            saved.append(t)
            return len(saved) - 1

        ctx.layout = (put(st.x), [put(t) for t in params], [put(t) for t in st.inputs],
                      {i: (put(d), tuple(put(t) for t in state)) for i, (d, state) in st.acts.items()},
                      {i: put(e) for i, e in es.items()}, put(u), put(v), [put(t) for t in grads])
        ctx.save_for_backward(*saved)
        ctx.chain, ctx.p, ctx.b = chain, p, b
        return out, value

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):
        saved = ctx.saved_tensors

        def get(k):
            return None if k is None else saved[k]

        x_k, param_ks, input_ks, act_ks, e_ks, u_k, v_k, direct_ks = ctx.layout
        chain, p, b = ctx.chain, ctx.p, ctx.b
        st = _ManualState.__new__(_ManualState)
        st.chain, st.x, st.params, st.out = chain, get(x_k), [get(k) for k in param_ks], None
        st.inputs = [get(k) for k in input_ks]
        st.acts = {i: (get(dk), tuple(get(k) for k in sks)) for i, (dk, sks) in act_ks.items()}
        es = {i: get(k) for i, k in e_ks.items()}
        u, v, direct = get(u_k), get(v_k), [get(k) for k in direct_ks]
        need = list(ctx.needs_input_grad[5:])
        need_x = ctx.needs_input_grad[4]
        enabled, dtype, dev = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            if bool((grad_logdet == grad_logdet[0]).all()):
                scale = grad_logdet[0]
                dx, grads = chain.backward(st, grad_gx, b, need, need_x, es, scale)
                grads = [c if a is None and c is None else
                         (c * scale if a is None else (a if c is None else a.addcmul_(c, scale)))
                         for a, c in zip(grads, direct)]
                ctx.chain = None
                return (None, None, None, None, dx if need_x else None, *grads)
            else:
                # Per-sample weights: the surrogate again (on a fresh evaluation), from u
                # scaled per row -- sum_b w_b s_b is the surrogate of that u.
                full = _ManualState(chain, st.x, st.params)
                wts = (grad_logdet.repeat(p) / p).view(-1, *([1] * (u.dim() - 1)))
                direct, es = chain.surrogate(full, u * wts, v, need, need_x)
                if p > 1:
                    es = {i: e.reshape(p, b, *e.shape[1:]).sum(0) for i, e in es.items()}
                dx, grads = chain.backward(st, grad_gx, b, need, need_x, es, 1.0)
            grads = [_add(a, c) for a, c in zip(grads, direct)]
        ctx.chain = None
        return (None, None, None, None, dx if need_x else None, *grads)


@register("estimator", "power_series")
class PowerSeriesLogDet(_SeriesLogDet):
    """Truncated series ``sum_{k=1}^{n_terms} (-1)^(k+1) tr(J^k)/k`` with Hutchinson traces (biased)."""

    def __init__(self, n_terms: int = 5, n_probes: int = 1, probe: str = "gaussian",
                 gradient: str = "backprop"):
        super().__init__(n_probes, probe, gradient)
        if n_terms < 1:
            raise ValueError(f"n_terms must be >= 1, got {n_terms}")
        self.n_terms = int(n_terms)

    def _plan(self):
        return self.n_terms, [1.0] * (self.n_terms + 1)

    def extra_repr(self) -> str:
        return (f"n_terms={self.n_terms}, n_probes={self.n_probes}, probe={self.probe!r}, "
                f"gradient={self.gradient!r}")


@register("estimator", "russian_roulette")
class RussianRouletteLogDet(_SeriesLogDet):
    """Unbiased Russian-roulette series: ``n_terms + N`` terms, ``N`` random.

    ``N`` counts from 0: geometric with ``P(N >= j) = (1-p)^j``, or Poisson(``lam``).
    Term ``k > n_terms`` is included iff ``N >= k - n_terms`` and then
    divided by that probability, so its expectation is the plain term. In eval
    mode ``eval_n_terms`` terms are exact (more accurate, still unbiased).
    The sampling parameters are plain floats, never trainable parameters.
    """

    def __init__(self, distribution: str = "geometric", p: float = 0.5, lam: float = 2.0,
                 n_terms: int = 2, n_probes: int = 1, probe: str = "gaussian",
                 gradient: str = "neumann", eval_n_terms: int = 20):
        super().__init__(n_probes, probe, gradient)
        if distribution not in ("geometric", "poisson"):
            raise ValueError(f"unknown distribution {distribution!r}; expected 'geometric' or 'poisson'")
        if distribution == "geometric" and not 0.0 < p < 1.0:
            raise ValueError(f"geometric p must lie in (0, 1), got {p}")
        if distribution == "poisson" and lam <= 0:
            raise ValueError(f"poisson lam must be positive, got {lam}")
        if n_terms < 0 or eval_n_terms < 0:
            raise ValueError("n_terms and eval_n_terms must be >= 0")
        self.distribution = distribution
        self.p = float(p)
        self.lam = float(lam)
        self.n_terms = int(n_terms)
        self.eval_n_terms = int(eval_n_terms)

    def sample_n(self) -> int:
        """One draw of ``N`` (from torch's CPU generator, so ``torch.manual_seed`` fixes it)."""
        if self.distribution == "geometric":
            # Inverse CDF: N = floor(log U / log(1-p)) gives P(N >= j) = (1-p)^j.
            u = torch.rand(()).clamp_min(torch.finfo(torch.float32).tiny).item()
            return int(math.floor(math.log(u) / math.log1p(-self.p)))
        return int(torch.poisson(torch.tensor(self.lam, dtype=torch.float64)).item())

    def tail_prob(self, j: int) -> float:
        """``P(N >= j)``."""
        if j <= 0:
            return 1.0
        if self.distribution == "geometric":
            return (1.0 - self.p) ** j
        # Sum the Poisson tail directly (1 - cdf would cancel for large j).
        log_lam = math.log(self.lam)
        tail, i = 0.0, j
        while True:
            term = math.exp(-self.lam + i * log_lam - math.lgamma(i + 1))
            tail += term
            if i > self.lam and (term < 1e-17 * tail or term == 0.0):
                return tail
            i += 1

    def _plan(self):
        n_exact = self.n_terms if self.training else self.eval_n_terms
        n = n_exact + self.sample_n()
        weights = [1.0 / self.tail_prob(k - n_exact) for k in range(n + 1)]
        return n, weights

    def extra_repr(self) -> str:
        dist = f"p={self.p}" if self.distribution == "geometric" else f"lam={self.lam}"
        return (f"distribution={self.distribution!r}, {dist}, n_terms={self.n_terms}, "
                f"eval_n_terms={self.eval_n_terms}, n_probes={self.n_probes}, "
                f"probe={self.probe!r}, gradient={self.gradient!r}")
