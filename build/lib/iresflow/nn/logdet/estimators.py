"""Log-determinant estimators for ``F(x) = x + g(x)``: ``log|det(I + J_g(x))|`` per sample.

For ``Lip(g) < 1``::

    log|det(I + J)| = tr log(I + J) = sum_{k>=1} (-1)^(k+1) tr(J^k) / k

Estimators differ in how many terms they keep:

* ``exact``: the full per-sample Jacobian and ``slogdet`` (small inputs only);
* ``power_series``: the first ``n_terms`` terms (biased, error ~ Lip^n / n);
* ``russian_roulette``: ``n_terms + N`` terms, ``N`` random, term ``k`` divided by the
  probability that it is included, so the estimate is unbiased.

The traces come from a trace estimator (kind ``trace``, :mod:`.trace`: ``hutchinson``,
``exact``, ``hutchpp``), the products ``v^T J^k`` from a Jacobian-product backend
(:mod:`.products`) of the one evaluation ``g(x)``. Gradient modes (``gradient``):

* ``backprop``: differentiate through the series (memory linear in the number of terms);
* ``neumann``: the value without a graph; the gradient from the Neumann surrogate
  ``u^T J v`` (:mod:`.series`; one product with a graph: memory constant in n);
* ``memory_efficient``: the Neumann gradient computed already in the forward pass, so
  only ``g``'s own graph and the finished gradients are kept until backward
  (:mod:`.fused` by hand for formula-defined chains, :mod:`.backward_in_forward` for any ``g``).

The truncated Neumann gradient uses every product computed for the value
(``k = 0..n``), so with exact traces it equals the backprop gradient of the
``(n+1)``-term series; with Russian roulette term ``k`` carries the same weight
``1/P(term k included)`` in value and gradient, keeping both unbiased.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from iresflow.nn.lipschitz import paused_power_iteration
from iresflow.nn.logdet import backward_in_forward, fused
from iresflow.nn.logdet.chain import chain_of, is_fusable
from iresflow.nn.logdet.products import AutogradProducts, ChainProducts
from iresflow.nn.logdet.series import series, surrogate
from iresflow.nn.logdet.trace import Hutchinson, TraceEstimator, probes_for
from iresflow.registry import Factory, instance, register

__all__ = ["GRADIENT_MODES", "LogDetEstimator", "ExactLogDet", "PowerSeriesLogDet", "RussianRouletteLogDet"]

GRADIENT_MODES = ("backprop", "neumann", "memory_efficient")


class LogDetEstimator(nn.Module):
    """Base class: ``estimator(g, x) -> (g(x), logdet[B])``."""

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
        with _paused_unless(grad), torch.enable_grad():
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
        except RuntimeError as err:
            if not _is_missing_batching_rule(err):
                raise
            rows = torch.stack([torch.autograd.grad(gx, x, o, create_graph=create_graph, retain_graph=True)[0]
                                for o in outs])
        return rows.reshape(d, b, d).transpose(0, 1)


def _is_missing_batching_rule(err: RuntimeError) -> bool:
    """vmap (behind ``is_grads_batched``) refusing an operation -- "Batching rule not
    implemented for ...", "vmap: ... not supported" -- not any error (out of memory, a
    shape mistake) that merely happens inside it."""
    text = str(err)
    return "Batching rule not implemented" in text or "vmap:" in text


def _paused_unless(grad_enabled: bool):
    """Re-enabling grad for a caller that had it off must not run the power iterations."""
    return contextlib.nullcontext() if grad_enabled else paused_power_iteration()


# --------------------------------------------------------------------------- series


def _trace_estimator(spec: Any) -> TraceEstimator:
    if spec is None:
        return Hutchinson()
    if isinstance(spec, (Factory, str, Mapping)):
        return instance(spec)
    if not isinstance(spec, TraceEstimator):
        raise TypeError(f"trace must be a trace estimator (kind 'trace'), got {type(spec).__name__}")
    return spec


class _SeriesLogDet(LogDetEstimator):
    """Shared machinery of the series estimators: trace estimator, backends, gradient modes.

    Subclasses choose the number of terms ``n`` and the weight ``c_k`` of term
    ``k`` (``k = 0`` is used only by the Neumann gradient series).
    """

    def __init__(self, trace: Any = None, gradient: str = "backprop"):
        super().__init__(gradient)
        self.trace = _trace_estimator(trace)

    def _plan(self) -> tuple[int, list[float]]:
        """``(n, [c_0, ..., c_n])``: number of terms and per-term weights."""
        raise NotImplementedError

    def forward(self, g: nn.Module, x: torch.Tensor, probes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(x), logdet[B])``. ``probes`` (``[P, *x.shape]`` or ``x.shape``) fixes the trace
        vectors (weighted ``1/P``) instead of the trace estimator's, e.g. for tests."""
        n, term_weights = self._plan()
        self.last_n_terms = n
        if probes is not None:
            probes = probes.unsqueeze(0) if probes.shape == x.shape else probes
            if probes.shape[1:] != x.shape:
                raise ValueError(f"probes must have shape [P, *{tuple(x.shape)}], got {tuple(probes.shape)}")
        chain = chain_of(g, x)
        fusable = chain is not None and is_fusable(chain)

        grad_enabled = torch.is_grad_enabled()
        needs_grad = grad_enabled and (x.requires_grad or any(p.requires_grad for p in g.parameters()))
        if not needs_grad:
            if fusable:
                out, value = fused.logdet_value(fused.FusedChain.of(chain, x), x, self.trace, probes, n, term_weights)
                return out, value
            with _paused_unless(grad_enabled), torch.enable_grad():
                xx = x.detach().requires_grad_()
                jac = self._products(g, chain, xx, probes)
                value, _ = series(jac, probes_for(self.trace, probes, xx, jac), n, term_weights,
                                  create_graph=False, neumann=False)
            return jac.out.detach(), value.detach()

        if self.gradient == "memory_efficient":
            if fusable:
                return fused.memory_efficient_logdet(fused.FusedChain.of(chain, x), x, self.trace, probes, n,
                                                     term_weights)
            return backward_in_forward.memory_efficient_logdet(g, x, self.trace, probes, n, term_weights)

        # Differentiate w.r.t. x itself when it carries a graph, else a fresh leaf
        # (the gradients then only reach g's parameters, which is all there is).
        xx = x if x.requires_grad else x.detach().requires_grad_()
        jac = self._products(g, chain, xx, probes)
        trace_probes = probes_for(self.trace, probes, xx, jac)
        if self.gradient == "backprop":
            logdet, _ = series(jac, trace_probes, n, term_weights, create_graph=True, neumann=False)
            return jac.out, logdet
        value, u = series(jac, trace_probes, n, term_weights, create_graph=False, neumann=True)
        s = surrogate(jac, u, trace_probes, create_graph=True)
        return jac.out, value + (s - s.detach())

    def _products(self, g, chain, x, probes):
        if chain is not None:
            return ChainProducts(chain, x)
        copies = probes.shape[0] if probes is not None else max(self.trace.n_vectors(x), self.trace.n_sketch(x))
        return AutogradProducts(g, x, copies)

    def extra_repr(self) -> str:
        return f"trace={self.trace!r}, gradient={self.gradient!r}"


@register("estimator", "power_series")
class PowerSeriesLogDet(_SeriesLogDet):
    """Truncated series ``sum_{k=1}^{n_terms} (-1)^(k+1) tr(J^k)/k`` (biased)."""

    def __init__(self, n_terms: int = 5, trace: Any = None, gradient: str = "backprop"):
        super().__init__(trace, gradient)
        if n_terms < 1:
            raise ValueError(f"n_terms must be >= 1, got {n_terms}")
        self.n_terms = int(n_terms)

    def _plan(self):
        return self.n_terms, [1.0] * (self.n_terms + 1)

    def extra_repr(self) -> str:
        return f"n_terms={self.n_terms}, {super().extra_repr()}"


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
                 n_terms: int = 2, trace: Any = None, gradient: str = "neumann", eval_n_terms: int = 20):
        super().__init__(trace, gradient)
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
                f"eval_n_terms={self.eval_n_terms}, {super().extra_repr()}")
