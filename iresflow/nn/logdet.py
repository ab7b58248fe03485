"""Log-determinant estimators for ``F(x) = x + g(x)``: ``log|det(I + J_g(x))|`` per sample.

For ``Lip(g) < 1``::

    log|det(I + J)| = tr log(I + J) = sum_{k>=1} (-1)^(k+1) tr(J^k) / k

Traces come from Hutchinson's estimator ``tr(A) = E[v^T A v]`` (``E[v v^T] = I``),
and ``v^T J^k`` from ``k`` repeated vector-Jacobian products of the one
evaluation ``g(x)``. Estimators differ in how many terms they keep:

* ``exact``: the full per-sample Jacobian and ``slogdet`` (small inputs only);
* ``power_series``: the first ``n_terms`` terms (biased, error ~ Lip^n / n);
* ``russian_roulette``: ``n_exact_terms + N`` terms, ``N`` random, term ``k``
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

The truncated Neumann gradient uses every vjp already computed for the value
(``k = 0..n``), so with exact traces it equals the backprop gradient of the
``(n+1)``-term series; with Russian roulette term ``k`` carries the same
weight ``1/P(term k included)`` in value and gradient, keeping both unbiased.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner product of two ``[rows, ...]`` tensors."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


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
    """Exact ``log|det(I + J_g)|`` from the full per-sample Jacobian (small inputs only)."""

    gradient_modes = ("backprop",)
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

        params = [p for p in g.parameters() if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if not needs_grad:
            with torch.enable_grad():
                xx = x.detach().requires_grad_()
                gx, xr, gxr, v, p = _evaluate(g, xx, probes)
                value, _ = _series(gxr, xr, v, p, n, weights, create_graph=False, neumann=False)
            return gx.detach(), value.detach()

        if self.gradient == "memory_efficient":
            gx, logdet = _BackwardInForward.apply(g, probes, n, weights, x, *params)
            return gx, logdet

        # Differentiate w.r.t. x itself when it carries a graph, else a fresh leaf
        # (the gradients then only reach g's parameters, which is all there is).
        xx = x if x.requires_grad else x.detach().requires_grad_()
        gx, xr, gxr, v, p = _evaluate(g, xx, probes)
        if self.gradient == "backprop":
            logdet, _ = _series(gxr, xr, v, p, n, weights, create_graph=True, neumann=False)
            return gx, logdet
        value, u = _series(gxr, xr, v, p, n, weights, create_graph=False, neumann=True)
        s = _surrogate(gxr, xr, u, v, p, create_graph=True)
        return gx, value + (s - s.detach())


def _evaluate(g, x, probes):
    """Evaluate g once. With P > 1 probes g runs on the batch repeated P times, so a
    single vjp chain serves all probes; ``gx`` is the first copy."""
    p = probes.shape[0]
    xr = x if p == 1 else x.repeat(p, *([1] * (x.dim() - 1)))
    gxr = g(xr)
    v = probes.reshape(p * x.shape[0], *x.shape[1:])
    return gxr[: x.shape[0]], xr, gxr, v, p


def _series(gxr, xr, v, p, n, weights, create_graph, neumann):
    """Value ``sum_{k=1}^n c_k (-1)^(k+1)/k v^T J^k v`` (averaged over probes) and,
    if ``neumann``, the detached Neumann vector ``u = sum_{k=0}^n (-1)^k c_k v^T J^k``.
    Only the current ``w = v^T J^k`` is kept, so without a graph memory is O(1) in n."""
    w = v
    total = v.new_zeros(v.shape[0])
    u = weights[0] * v if neumann else None
    for k in range(1, n + 1):
        w = _vjp(gxr, xr, w, create_graph)
        sign = 1.0 if k % 2 == 1 else -1.0
        total = total + (sign * weights[k] / k) * _dot(w, v)
        if neumann:
            u = u - sign * weights[k] * w.detach()
    value = total.view(p, -1).mean(0)
    return value, (u.detach() if neumann else None)


def _surrogate(gxr, xr, u, v, p, create_graph):
    """Per-sample ``mean_p u_p^T J v_p``; its gradient is the Neumann log-det gradient."""
    s = _dot(_vjp(gxr, xr, u, create_graph), v)
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
    saved Neumann vector with the right per-sample weights.
    """

    @staticmethod
    def forward(ctx, g, probes, n, weights, x, *params):
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            gx, xr, gxr, v, p = _evaluate(g, xx, probes)
            value, u = _series(gxr, xr, v, p, n, weights, create_graph=False, neumann=True)
            s = _surrogate(gxr, xr, u, v, p, create_graph=True)
            grads = torch.autograd.grad(s.sum(), [xx, *params], retain_graph=True,
                                        allow_unused=True)
        # Keep g's first-order graph for the vjp of g(x) in backward.
        ctx.gx, ctx.gxr, ctx.xx, ctx.xr, ctx.p = gx, gxr, xx, xr, p
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
                s = _surrogate(gxr, xr, u, v, ctx.p, create_graph=True)
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
    """Unbiased Russian-roulette series: ``n_exact_terms + N`` terms, ``N`` random.

    ``N`` counts from 0: geometric with ``P(N >= j) = (1-p)^j``, or Poisson(``lam``).
    Term ``k > n_exact_terms`` is included iff ``N >= k - n_exact_terms`` and then
    divided by that probability, so its expectation is the plain term. In eval
    mode ``eval_n_exact_terms`` terms are exact (more accurate, still unbiased).
    The sampling parameters are plain floats, never trainable parameters.
    """

    def __init__(self, distribution: str = "geometric", p: float = 0.5, lam: float = 2.0,
                 n_exact_terms: int = 2, n_probes: int = 1, probe: str = "gaussian",
                 gradient: str = "neumann", eval_n_exact_terms: int = 20):
        super().__init__(n_probes, probe, gradient)
        if distribution not in ("geometric", "poisson"):
            raise ValueError(f"unknown distribution {distribution!r}; expected 'geometric' or 'poisson'")
        if distribution == "geometric" and not 0.0 < p < 1.0:
            raise ValueError(f"geometric p must lie in (0, 1), got {p}")
        if distribution == "poisson" and lam <= 0:
            raise ValueError(f"poisson lam must be positive, got {lam}")
        if n_exact_terms < 0 or eval_n_exact_terms < 0:
            raise ValueError("n_exact_terms and eval_n_exact_terms must be >= 0")
        self.distribution = distribution
        self.p = float(p)
        self.lam = float(lam)
        self.n_exact_terms = int(n_exact_terms)
        self.eval_n_exact_terms = int(eval_n_exact_terms)

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
        n_exact = self.n_exact_terms if self.training else self.eval_n_exact_terms
        n = n_exact + self.sample_n()
        weights = [1.0 / self.tail_prob(k - n_exact) for k in range(n + 1)]
        return n, weights

    def extra_repr(self) -> str:
        dist = f"p={self.p}" if self.distribution == "geometric" else f"lam={self.lam}"
        return (f"distribution={self.distribution!r}, {dist}, n_exact_terms={self.n_exact_terms}, "
                f"eval_n_exact_terms={self.eval_n_exact_terms}, n_probes={self.n_probes}, "
                f"probe={self.probe!r}, gradient={self.gradient!r}")
