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
