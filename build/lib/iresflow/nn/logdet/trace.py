"""Trace estimators (kind ``trace``): ``tr(A_b)`` for every sample from products with probes.

The log-det series needs ``tr(J^k)`` for ``k = 1..n``; every term uses the same
probes. A trace estimator chooses probe vectors ``v_p`` and weights ``w_p`` with::

    tr(A) ~ sum_p w_p v_p^T A v_p          (equal in expectation, for every A)

and the series applies it to ``A = log(I + J)`` term by term, so each probe costs
``n`` vector-Jacobian products.

* ``hutchinson``: ``v_p`` i.i.d. Gaussian or Rademacher (``E[v v^T] = I``), ``w_p = 1/P``.
  The variance of one probe is ``2 ||A||_F^2`` (Gaussian), ``2 (||A||_F^2 - sum_i A_ii^2)``
  (Rademacher).
* ``exact``: the ``d`` basis vectors ``e_i`` with ``w_i = 1``: ``tr(A) = sum_i e_i^T A e_i``
  exactly (Residual Flows' ``exact_trace``), at ``d`` products per term: small inputs only.
* ``hutchpp``: Hutch++ (Meyer, Musco, Musco & Woodruff, 2021). A sketch ``Y = J^T S`` of
  ``rank`` Gaussian vectors, orthonormalised per sample (``Q = qr(Y)``), holds the dominant
  subspace; that part of the trace is taken exactly (probes ``q_i``, weight 1) and the rest
  by Hutchinson on the deflated probes ``(I - Q Q^T) g_j`` (weight ``1 / n_probes``). Since
  ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))`` for every orthonormal ``Q``, the
  estimate is unbiased whatever the sketch, and ``Q`` is held fixed (no gradient through it).
  The sketch uses ``J`` itself (one product per vector): for ``Lip(J) < 1`` the dominant
  subspace of ``log(I + J) = J - J^2/2 + ...`` is close to ``J``'s. The variance is that of
  Hutchinson on the deflated matrix: it pays when the spectrum of ``J`` decays.

Random probes are drawn from torch's generator (``torch.manual_seed`` fixes them).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from iresflow.registry import register

__all__ = ["Probes", "TraceEstimator", "probes_for", "uniform_probes", "Hutchinson", "ExactTrace", "HutchPlusPlus",
           "sample_probes", "PROBES"]

PROBES = ("gaussian", "rademacher")
Tensor = torch.Tensor


class Probes(NamedTuple):
    """``tr(A_b) ~ sum_p weights[p] * vectors[p, b]^T A_b vectors[p, b]``."""

    vectors: Tensor  # [P, B, *sample_shape]
    weights: Tensor  # [P]


class VectorJacobian(Protocol):
    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor: ...


def sample_probes(x: Tensor, n_probes: int, kind: str = "gaussian") -> Tensor:
    """``n_probes`` probes shaped ``[n_probes, *x.shape]`` with ``E[v v^T] = I``."""
    shape = (n_probes, *x.shape)
    if kind == "gaussian":
        return torch.randn(shape, dtype=x.dtype, device=x.device)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, device=x.device).to(x.dtype) * 2 - 1
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")


def _check_probe(probe: str) -> str:
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
    return probe


class TraceEstimator:
    """Base class: :meth:`probes` for an input ``x``; the vector counts for the cost."""

    def n_vectors(self, x: Tensor) -> int:
        """Probe vectors per trace (vector-Jacobian products per series term)."""
        raise NotImplementedError

    def n_sketch(self, x: Tensor) -> int:
        """Products with ``J`` spent before the series (a sketch), per sample."""
        return 0

    def probes(self, x: Tensor, jacobian: VectorJacobian) -> Probes:
        """Probes for every sample of ``x``; ``jacobian.vjp`` gives ``w^T J`` (for a sketch)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def uniform_probes(vectors: Tensor) -> Probes:
    """Given vectors, weighted ``1/P`` (Hutchinson's mean)."""
    p = vectors.shape[0]
    return Probes(vectors, torch.full((p,), 1.0 / p, dtype=_weight_dtype(vectors), device=vectors.device))


def probes_for(trace: TraceEstimator, given: Tensor | None, x: Tensor, jacobian: VectorJacobian) -> Probes:
    """The trace estimator's probes for ``x``, or the ``given`` vectors (``[P, *x.shape]``)
    weighted ``1/P``."""
    if given is not None:
        return uniform_probes(given)
    return trace.probes(x, jacobian)


def _weight_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@register("trace", "hutchinson", description="Hutchinson: mean of v^T A v over Gaussian or Rademacher probes")
class Hutchinson(TraceEstimator):
    def __init__(self, n_probes: int = 1, probe: str = "gaussian"):
        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        self.n_probes = int(n_probes)
        self.probe = _check_probe(probe)

    def n_vectors(self, x):
        return self.n_probes

    def probes(self, x, jacobian=None):
        return uniform_probes(sample_probes(x, self.n_probes, self.probe))


@register("trace", "exact", description="exact trace from the d basis vectors (d products per term; small inputs)")
class ExactTrace(TraceEstimator):
    max_dim = 4096

    def n_vectors(self, x):
        return x[0].numel()

    def probes(self, x, jacobian=None):
        d = x[0].numel()
        if d > self.max_dim:
            raise ValueError(f"the exact trace needs {d} products per term ({d} features per sample), "
                             f"above the limit of {self.max_dim}: use hutchinson or hutchpp")
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        vectors = eye[:, None, :].expand(d, x.shape[0], d).reshape(d, *x.shape)
        return Probes(vectors, torch.ones(d, dtype=_weight_dtype(x), device=x.device))


@register("trace", "hutchpp", description="Hutch++: a sketch of J's dominant subspace taken exactly, "
                                          "Hutchinson on the rest (lower variance when the spectrum decays)")
class HutchPlusPlus(TraceEstimator):
    """Hutch++ with a ``rank``-vector sketch of ``J`` and ``n_probes`` deflated probes."""

    def __init__(self, rank: int = 2, n_probes: int = 2, probe: str = "gaussian"):
        if rank < 1 or n_probes < 1:
            raise ValueError(f"rank and n_probes must be >= 1, got {rank} and {n_probes}")
        self.rank = int(rank)
        self.n_probes = int(n_probes)
        self.probe = _check_probe(probe)

    def _rank(self, x: Tensor) -> int:
        return min(self.rank, x[0].numel())

    def n_vectors(self, x):
        return self._rank(x) + (0 if self._rank(x) == x[0].numel() else self.n_probes)

    def n_sketch(self, x):
        return self._rank(x)

    def probes(self, x, jacobian):
        b, d, r = x.shape[0], x[0].numel(), self._rank(x)
        acc = _weight_dtype(x)
        sketch = torch.randn(r, *x.shape, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            y = jacobian.vjp(sketch, create_graph=False)
        basis, _ = torch.linalg.qr(y.detach().reshape(r, b, d).permute(1, 2, 0).to(acc))  # [B, d, r]
        q = basis.permute(2, 0, 1)  # [r, B, d]
        if r == d:  # Q spans everything: the trace is exact
            return Probes(q.to(x.dtype).reshape(r, *x.shape), torch.ones(r, dtype=acc, device=x.device))
        g = sample_probes(x, self.n_probes, self.probe).reshape(self.n_probes, b, d).to(acc)
        # (I - Q Q^T) g per sample
        deflated = g - torch.einsum("rbi,pbr->pbi", q, torch.einsum("rbi,pbi->pbr", q, g))
        vectors = torch.cat([q, deflated]).to(x.dtype).reshape(r + self.n_probes, *x.shape)
        weights = torch.cat([torch.ones(r, dtype=acc, device=x.device),
                             torch.full((self.n_probes,), 1.0 / self.n_probes, dtype=acc, device=x.device)])
        return Probes(vectors, weights)
