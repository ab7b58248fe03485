"""The largest singular value of a linear operator ``W``, by Lanczos iteration on its smaller Gram operator.

Power iteration converges like ``(sigma_2 / sigma_1)^(2k)``: slowly for a convolution, whose
operator has many singular values close to the top (nearby spatial frequencies), so a
tolerance on the change per iteration stops it far from ``sigma_1`` (1e-3 relative on a 3x3
conv at 6x6). Lanczos builds the Krylov space of ``A`` from a start vector and takes the top
Ritz value of the tridiagonal ``T_k``: it converges like a Chebyshev polynomial of the gap,
in far fewer products. Warm-started from the previous top vector (the weights moved by one
optimiser step), a few steps suffice. Full reorthogonalisation keeps the basis orthonormal
(k is small); the arithmetic is float64.

``A`` is ``W^T W`` or ``W W^T``, whichever acts on the smaller space (the basis and its
reorthogonalisation cost that dimension). The Ritz value is a lower bound of ``sigma_1^2`` that
rises with ``k``; iteration stops when the Ritz pair's residual ``||A y - theta y|| = beta_k |s_k|``
is below ``tol * theta``, checked every :data:`CHECK_EVERY` steps (a check is a small
eigendecomposition; between checks a step is two operator products and the reorthogonalisation).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["CHECK_EVERY", "top_singular_pairs"]

_EPS = 1e-300

#: steps between residual checks (also the fewest steps run, unless the Krylov space is exhausted first)
CHECK_EVERY = 4

Op = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def top_singular_pairs(op: Op, op_t: Op, v0: torch.Tensor, u0: torch.Tensor | None = None, tol: float = 1e-7,
                       max_steps: int = 60) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(sigma, u, v, steps)`` for ``B`` linear maps at once: each one's top singular value and unit
    vectors with ``W v = sigma u``. ``op`` maps ``[B, n_in]`` to ``[B, n_out]`` (the ``B`` products ``W v``),
    ``op_t`` back (``W^T u``); ``v0`` ``[B, n_in]`` and ``u0`` ``[B, n_out]`` are the start vectors, and
    Lanczos runs on the side with fewer dimensions (``u0=None``: the input side). Returns ``sigma`` ``[B]``
    (``||W v||``: never above ``sigma_1``), ``u`` ``[B, n_out]``, ``v`` ``[B, n_in]`` and the steps taken."""
    if u0 is not None and u0.shape[-1] < v0.shape[-1]:
        u, steps = _top_eigenvectors(lambda x: op(op_t(x)), u0, tol, max_steps)
        v = op_t(u)   # (Lanczos on W W^T, the output side; then v from u)
    else:
        v, steps = _top_eigenvectors(lambda x: op_t(op(x)), v0, tol, max_steps)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(_EPS)
    u = op(v)
    sigma = torch.linalg.vector_norm(u, dim=-1)
    return sigma, u / sigma.clamp_min(_EPS).unsqueeze(-1), v, steps


def _top_eigenvectors(gram: Op, x0: torch.Tensor, tol: float, max_steps: int) -> tuple[torch.Tensor, int]:
    """The top Ritz vectors ``[B, n]`` of ``B`` symmetric PSD operators (``gram`` maps ``[B, n]`` to
    ``[B, n]``) from the start vectors ``x0`` ``[B, n]``, and the steps taken: until every member's residual
    is below ``tol`` or the Krylov spaces are exhausted. A member whose ``beta`` vanishes (an invariant
    subspace, e.g. the operator's rank reached: its Ritz values are exact) adds only zero rows to its ``T``
    from then on, which leave its top Ritz pair unchanged."""
    batch, n = x0.shape
    last = min(max_steps, n)
    basis = x0.new_zeros(batch, last, n)
    q = x0 / torch.linalg.vector_norm(x0, dim=-1, keepdim=True).clamp_min(_EPS)
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    vanished = None
    k = 0
    while True:
        basis[:, k] = q
        k += 1
        w = gram(q)
        alphas.append((w * q).sum(-1))
        stacked = basis[:, :k]                                               # [B, k, n]
        for _ in range(2):                                                   # full reorthogonalisation, twice
            w = w - torch.bmm(torch.bmm(stacked, w.unsqueeze(-1)).transpose(1, 2), stacked).squeeze(1)
        beta = torch.linalg.vector_norm(w, dim=-1)
        if vanished is None:  # ~ rounding of the products (|A q| <= sigma_1^2)
            vanished = 1e-13 * torch.hypot(beta, alphas[0]) + _EPS
        beta = torch.where(beta <= vanished, torch.zeros_like(beta), beta)
        exhausted = k == last or not bool(beta.any())
        if exhausted or k % CHECK_EVERY == 0:
            t = torch.diag_embed(torch.stack(alphas, -1))
            if betas:
                off = torch.stack(betas, -1)
                t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
            values, vectors = torch.linalg.eigh(t)
            theta, s = values[:, -1], vectors[:, :, -1]
            if exhausted or bool((beta * s[:, -1].abs() <= tol * theta.clamp_min(0)).all()):
                return torch.bmm(s.unsqueeze(1), stacked).squeeze(1), k
        betas.append(beta)
        q = torch.where((beta > 0).unsqueeze(-1), w / beta.clamp_min(_EPS).unsqueeze(-1), torch.zeros_like(w))
