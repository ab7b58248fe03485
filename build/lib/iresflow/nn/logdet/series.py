"""The log-det series and the Neumann surrogate, written as their formulas.

With probes ``v_p`` and weights ``w_p`` of a trace estimator (:mod:`.trace`) and the
per-term weights ``c_k`` of a series estimator (1 for a truncated series, the
inverse inclusion probabilities for Russian roulette)::

    log|det(I + J)| ~ sum_p w_p sum_{k=1}^n c_k (-1)^(k+1) / k  v_p^T J^k v_p

and the Neumann gradient ``d log det(I + J) = tr((I + J)^{-1} dJ)
= sum_{k>=0} (-1)^k tr(J^k dJ)`` is the gradient of the surrogate ``sum_p u_p^T J v_p``
with the vectors held constant::

    u_p = w_p sum_{k=0}^n (-1)^k c_k v_p^T J^k

Every ``w^T J`` is a ``vjp`` of a Jacobian-product backend (:mod:`.products`), and
every inner product is formed in float32 or wider (under autocast the products may be
bfloat16; the series is still accumulated in float32).
"""

from __future__ import annotations

import torch

from iresflow.nn.logdet.products import JacobianProducts
from iresflow.nn.logdet.trace import Probes

__all__ = ["accumulation_dtype", "dot", "series", "matrix_series", "surrogate"]


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and float32 (never below float32)."""
    acc = torch.float32
    for dt in dtypes:
        if dt != acc:
            acc = torch.promote_types(acc, dt)
    return acc


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner product per probe and sample of two ``[P, B, ...]`` tensors -> ``[P, B]``,
    in float32 or wider."""
    acc = accumulation_dtype(a.dtype, b.dtype)
    return (a.to(acc) * b.to(acc)).flatten(2).sum(2)


def series(jac: JacobianProducts, probes: Probes, n: int, term_weights: list[float], create_graph: bool,
           neumann: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-det estimate per sample and, with ``neumann``, the detached Neumann vectors ``u``.

    Only the current ``v^T J^k`` is kept, so without a graph memory is constant in ``n``.
    """
    v, weights = probes
    w = v
    total = v.new_zeros(v.shape[:2], dtype=accumulation_dtype(v.dtype))  # [P, B]
    u = term_weights[0] * v.to(total.dtype) if neumann else None
    for k in range(1, n + 1):
        w = jac.vjp(w, create_graph)
        sign = 1.0 if k % 2 == 1 else -1.0
        total = total + (sign * term_weights[k] / k) * dot(w, v)
        if neumann:
            u = u - sign * term_weights[k] * w.detach()
    value = (weights.to(total.dtype)[:, None] * total).sum(0)
    if not neumann:
        return value, None
    return value, (weights.to(u.dtype).view(-1, *[1] * (u.dim() - 1)) * u).detach()


def matrix_series(jac: torch.Tensor, probes: Probes, n: int, term_weights: list[float], neumann: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`series` with the per-sample Jacobian ``jac [B, D, D]`` materialised (small ``D``):
    the two sums are matrix polynomials, formed once and applied to the probes::

        value = sum_p w_p v_p^T (sum_{k=1}^n c_k (-1)^(k+1)/k J^k) v_p
        u_p   = w_p v_p^T (sum_{k=0}^n (-1)^k c_k J^k)
    """
    if torch.is_autocast_enabled(jac.device.type):  # tiny matrices: in float32 or wider throughout
        with torch.autocast(jac.device.type, enabled=False):
            return _matrix_series(jac, probes, n, term_weights, neumann)
    return _matrix_series(jac, probes, n, term_weights, neumann)


def _matrix_series(jac, probes, n, term_weights, neumann):
    v, weights = probes
    acc = accumulation_dtype(v.dtype, jac.dtype)
    jac = jac.to(acc)
    power = jac
    log_part = jac * term_weights[1] if n >= 1 else torch.zeros_like(jac)
    if neumann:
        eye = torch.eye(jac.shape[-1], dtype=acc, device=jac.device)
        neumann_part = (eye * term_weights[0]).expand_as(jac) - (jac * term_weights[1] if n >= 1 else 0.0)
    for k in range(2, n + 1):
        power = torch.bmm(power, jac)
        sign = 1.0 if k % 2 == 1 else -1.0
        log_part.add_(power, alpha=sign * term_weights[k] / k)
        if neumann:
            neumann_part.add_(power, alpha=-sign * term_weights[k])
    vv = v.to(acc).transpose(0, 1)  # [B, P, D]
    weights = weights.to(acc)
    value = torch.bmm(vv, log_part).mul_(vv).sum(-1) @ weights  # sum_p w_p v_p^T A v_p
    if not neumann:
        return value, None
    u = torch.bmm(vv, neumann_part).mul_(weights[:, None]).transpose(0, 1)
    return value, u


def surrogate(jac: JacobianProducts, u: torch.Tensor, probes: Probes, create_graph: bool) -> torch.Tensor:
    """``sum_p u_p^T J v_p`` per sample: its gradient is the Neumann log-det gradient."""
    return dot(jac.vjp(u.to(probes.vectors.dtype), create_graph), probes.vectors).sum(0)
