"""Test-only building blocks, independent of iresflow.nn.residual."""

import torch
from torch import nn


class ContractiveMLP(nn.Module):
    """``g(x) = W2 tanh(W1 x + b1) + b2`` with ``||W1|| = 1``, ``||W2|| = c`` (weights divided by
    their exact spectral norm): Lip(g) <= c. Counts its calls and records its mode per call."""

    def __init__(self, dim, hidden, c, dtype=torch.float64, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim, hidden, dtype=dtype)
        self.l2 = nn.Linear(hidden, dim, dtype=dtype)
        with torch.no_grad():
            for lin, scale in ((self.l1, 1.0), (self.l2, c)):
                w = torch.randn(lin.weight.shape, generator=gen, dtype=dtype)
                lin.weight.copy_(scale * w / torch.linalg.matrix_norm(w, ord=2))
                lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen, dtype=dtype))
        self.c = c
        self.calls = 0
        self.modes = []

    def forward(self, x):
        self.calls += 1
        self.modes.append(self.training)
        return self.l2(torch.tanh(self.l1(x)))

    def lipschitz_bound(self):
        return self.c


class Opaque(nn.Module):
    """Hides ``g``'s structure (it is no plain layer chain): the log-det estimators take their
    generic autograd path, the reference for their fast paths."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        return self.g(x)


def logdet_and_grads(est, g, x, weights, probes=None, seed=None):
    """``[logdet, d/dx, d/dparams]`` of ``sum(weights * logdet) + |g(x)|^2 / 2`` through ``est``
    (``seed``: the same random probes on both sides of a comparison)."""
    x = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    gx, logdet = est(g, x) if probes is None else est(g, x, probes=probes)
    loss = (weights * logdet).sum() + 0.5 * (gx ** 2).sum()
    return [logdet.detach(), *torch.autograd.grad(loss, [x, *(p for p in g.parameters() if p.requires_grad)])]


def spectral_norm(j: torch.Tensor) -> float:
    """Largest singular value of a materialised matrix (the exact operator norm)."""
    return torch.linalg.matrix_norm(j, ord=2).item()


def jacobian_norms(g, x) -> list[float]:
    """``||J_g(x_i)||_2`` for every sample of ``x``, from the materialised Jacobian (eval mode)."""
    g.eval()
    out = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda t: g(t.unsqueeze(0)).flatten(), xi, vectorize=True)
        out.append(spectral_norm(j.reshape(j.shape[0], -1)))
    return out
