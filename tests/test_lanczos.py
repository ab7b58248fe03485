"""``iresflow.nn.lanczos``: the top singular pair against float64 SVD, on either side of the operator."""

import pytest
import torch

from iresflow.nn.lanczos import top_singular_pairs
from iresflow.nn.spectral_norm import _stacked_products


def _pair(m: torch.Tensor, v0: torch.Tensor, u0: torch.Tensor | None, tol: float = 1e-10):
    """One matrix through the batched interface (a batch of one)."""
    sigma, u, v, steps = top_singular_pairs(lambda x: x @ m.t(), lambda y: y @ m, v0[None],
                                            None if u0 is None else u0[None], tol=tol, max_steps=200)
    return sigma[0], u[0], v[0], steps


@pytest.mark.parametrize("shape", [(3, 200), (200, 3), (64, 64), (40, 120), (120, 40)])
def test_top_pair_equals_the_svd_from_either_side(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    m = torch.randn(shape, generator=gen, dtype=torch.float64)
    exact = torch.linalg.svdvals(m)[0]
    v0 = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    u0 = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    for start_u in (None, u0):
        sigma, u, v, steps = _pair(m, v0, start_u)
        assert float(sigma) <= float(exact) * (1 + 1e-14)            # ||W v|| never exceeds sigma_1
        assert abs(float(sigma) / float(exact) - 1) < 1e-12
        assert torch.allclose(m @ v, sigma * u, atol=1e-12)          # the pair the normalisation uses
        assert abs(float(v.norm()) - 1) < 1e-12 and abs(float(u.norm()) - 1) < 1e-12
        assert steps <= min(shape) + 1             # rank + 1: the start may hold a null-space part
        if start_u is not None:
            assert steps <= min(shape)              # Lanczos ran on the smaller side's Gram operator


def test_clustered_top_and_a_start_nearly_orthogonal_to_the_top_vector():
    """A near-degenerate top (what a convolution's spectrum looks like) and a warm start that is the
    *second* singular vector plus 1e-6 of the first (the top ones swapped after a step): the estimate
    still reaches sigma_1."""
    gen = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(80, 80, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    s = torch.linspace(1.0, 0.1, 60, dtype=torch.float64)
    s[1] = 1.0 - 1e-3                                   # the second value 0.1% below the top
    m = q1[:, :60] @ torch.diag(s) @ q2.t()
    v0 = q2[:, 1] + 1e-6 * q2[:, 0]
    sigma, _, _, _ = _pair(m, v0, None, tol=1e-5)
    assert abs(float(sigma) - 1.0) < 1e-7


def test_a_stack_of_matrices_at_once_equals_each_ones_svd():
    """The batched upkeep of same-shaped dense maps: every member's pair is its own, including a zero
    matrix and a rank-1 one (whose Krylov spaces end early) beside full-rank ones, on either side."""
    gen = torch.Generator().manual_seed(5)
    for shape in ((6, 40, 30), (6, 30, 40)):
        m = torch.randn(shape, generator=gen, dtype=torch.float64)
        m[1] = 0.0
        m[2] = torch.outer(torch.randn(shape[1], generator=gen, dtype=torch.float64),
                           torch.randn(shape[2], generator=gen, dtype=torch.float64))
        v0 = torch.randn(shape[0], shape[2], generator=gen, dtype=torch.float64)
        u0 = torch.randn(shape[0], shape[1], generator=gen, dtype=torch.float64)
        sigma, u, v, _ = top_singular_pairs(*_stacked_products(m), v0, u0, tol=1e-10, max_steps=200)
        exact = torch.linalg.matrix_norm(m, ord=2)
        assert torch.allclose(sigma, exact, rtol=1e-12, atol=1e-300)
        assert bool((sigma <= exact * (1 + 1e-14)).all())
        full = [i for i in range(shape[0]) if i != 1]
        assert torch.allclose(torch.bmm(m, v.unsqueeze(-1)).squeeze(-1)[full], (sigma.unsqueeze(-1) * u)[full],
                              atol=1e-12)
