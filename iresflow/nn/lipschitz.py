"""Spectrally normalised Linear and Conv2d: ``W <- W / max(1, sigma(W) / c)``.

``sigma`` is the largest singular value of the *operator* the layer applies:
for a dense layer (and a 1x1 convolution with stride 1) that is the weight
matrix; for a k x k convolution it is the convolution map on inputs of the
real size, with the layer's stride and padding. The norm of the reshaped
kernel matrix is not that operator's norm (it can be several times smaller),
so convolutions iterate with ``conv2d`` and its adjoint ``conv_transpose2d``.

``sigma`` is estimated by power iteration on persistent vectors ``u`` (output
side) and ``v`` (input side), kept as buffers so that a few iterations per
step suffice and checkpoints carry them. The forward uses
``sigma = <u, W v>`` *with* gradient through ``W`` (the vectors are constants),
so the optimiser sees the normalisation, and the soft scaling leaves layers
already below ``c`` untouched.

Iterations run (a) ``n_iterations`` times at every training forward and (b)
on demand through :func:`update_lipschitz`, which the Lightning tasks call
after each optimiser step and before evaluation: the user never has to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LipschitzLinear", "LipschitzConv2d", "LIPSCHITZ_LAYERS", "update_lipschitz"]

_EPS = 1e-12


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(_EPS)


class _SpectralNorm:
    """Power iteration and soft scaling shared by the two layers.

    Subclasses provide ``_op(v, W)`` (the operator ``W v``), ``_op_t(u, W)``
    (``W^T u``) and ``_sigma(weight)`` (``<u, W v>`` for a given weight).
    """

    coeff: float
    n_iterations: int
    tol: float | None
    max_iterations: int
    weight: nn.Parameter
    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor

    def _init_spectral(self, coeff: float, n_iterations: int, tol: float | None, max_iterations: int):
        if not coeff > 0:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if n_iterations < 0 or max_iterations < 1:
            raise ValueError("n_iterations must be >= 0 and max_iterations >= 1")
        self.coeff = float(coeff)
        self.n_iterations = int(n_iterations)
        self.tol = tol
        self.max_iterations = int(max_iterations)

    @torch.no_grad()
    def power_iteration(self, n_iterations: int | None = None, tol: float | None = None) -> int:
        """Run power iterations on ``u``/``v``; returns how many ran.

        ``n_iterations`` bounds the count (default ``max_iterations`` when a
        ``tol`` is given, else the layer's ``n_iterations``); with ``tol`` the
        loop stops once the estimate of sigma changes by less than ``tol``
        relative. The new estimate is stored in the ``sigma`` buffer.
        """
        tol = self.tol if tol is None else tol
        if n_iterations is None:
            n_iterations = self.max_iterations if tol is not None else self.n_iterations
        w = self.weight.detach()
        with torch.autocast(w.device.type, enabled=False):
            return self._iterate(w, n_iterations, tol)

    def _iterate(self, w: torch.Tensor, n_iterations: int, tol: float | None) -> int:
        u, v = self.u, self.v
        sigma = self.sigma.clone()
        done = 0
        for done in range(1, n_iterations + 1):
            v = _normalize(self._op_t(u, w))
            wv = self._op(v, w)
            new_sigma = wv.norm()
            u = _normalize(wv)
            # Only a tolerance needs the value on the host (a GPU sync per iteration).
            converged = tol is not None and abs(new_sigma.item() - sigma.item()) <= tol * max(new_sigma.item(), _EPS)
            sigma = new_sigma
            if converged:
                break
        # In-place copies keep the buffers shared with DDP's broadcast and state_dict.
        self.u.copy_(u)
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        return done

    def spectral_norm(self) -> torch.Tensor:
        """``<u, W v>``: the current estimate of sigma(W), differentiable in W.

        Always in the weight's own precision: under bf16 autocast a 3-digit
        sigma would let the normalised layer overshoot ``coeff``.
        """
        with torch.autocast(self.weight.device.type, enabled=False):
            return self._sigma(self.weight)

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, sigma / coeff)``, the weight the forward uses."""
        sigma = self.spectral_norm()
        factor = torch.clamp(sigma / self.coeff, min=1.0)
        return self.weight / factor

    def lipschitz_constant(self) -> float:
        """Operator norm of the normalised weight, ``min(sigma, coeff)`` by the current estimate."""
        with torch.no_grad():
            return min(float(self.spectral_norm()), self.coeff)

    def _maybe_iterate(self) -> None:
        if self.training and self.n_iterations > 0 and torch.is_grad_enabled():
            self.power_iteration(self.n_iterations, tol=self.tol)


class LipschitzLinear(nn.Linear, _SpectralNorm):
    """``nn.Linear`` with ``Lip <= coeff`` by soft spectral normalisation (the matrix norm).

    Args:
        coeff: target bound c on the operator norm.
        n_iterations: power iterations at every training forward (0: only
            through :func:`update_lipschitz`).
        tol: optional relative tolerance that stops iterating early.
        max_iterations: the cap used when iterating to ``tol``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, coeff: float = 0.97,
                 n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200):
        super().__init__(in_features, out_features, bias=bias)
        self._init_spectral(coeff, n_iterations, tol, max_iterations)
        self.register_buffer("u", _normalize(torch.randn(out_features)))
        self.register_buffer("v", _normalize(torch.randn(in_features)))
        self.register_buffer("sigma", torch.zeros(()))
        # Start close to the true norm, so that the first steps are already constrained.
        self.power_iteration(max_iterations, tol=1e-4)

    def _op(self, v, w):
        return w @ v

    def _op_t(self, u, w):
        return w.t() @ u

    def _sigma(self, w):
        return torch.dot(self.u, w @ self.v)

    def lipschitz_constant(self) -> float:
        # The matrix is small: its exact spectral norm is cheap and a true upper bound.
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.normalized_weight(), ord=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._maybe_iterate()
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coeff={self.coeff}, n_iterations={self.n_iterations}"


class LipschitzConv2d(nn.Conv2d, _SpectralNorm):
    """``nn.Conv2d`` whose *convolution operator* has norm ``<= coeff``.

    Args:
        input_size: ``(H, W)`` of the inputs. The operator norm depends on it
            (through the padding at the border); when ``None`` it is taken from
            the first forward. A 1x1 convolution with stride 1 needs none (its
            operator norm is the matrix norm).
        coeff, n_iterations, tol, max_iterations: as :class:`LipschitzLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, *, input_size: tuple[int, int] | None = None, coeff: float = 0.97,
                 n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        if self.groups != 1 or self.dilation != (1, 1) or isinstance(self.padding, str):
            raise ValueError("LipschitzConv2d supports groups=1, dilation=1 and integer padding")
        self._init_spectral(coeff, n_iterations, tol, max_iterations)
        self.is_matrix = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        self.register_buffer("sigma", torch.zeros(()))
        self.input_size: tuple[int, int] | None = None
        if self.is_matrix:
            self._set_vectors(torch.randn(in_channels), torch.randn(out_channels))
        elif input_size is not None:
            self._init_operator(tuple(input_size))
        else:
            self.register_buffer("u", torch.empty(0))
            self.register_buffer("v", torch.empty(0))

    # -- vectors -----------------------------------------------------------
    def _set_vectors(self, v: torch.Tensor, u: torch.Tensor) -> None:
        for name, t in (("u", u), ("v", v)):
            t = _normalize(t.to(self.weight))
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def _init_operator(self, input_size: tuple[int, int]) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        ho, wo = self._out_size(*self.input_size)
        self._set_vectors(torch.randn(1, self.in_channels, *self.input_size),
                          torch.randn(1, self.out_channels, ho, wo))
        self.power_iteration(self.max_iterations, tol=1e-4)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A layer whose input size was inferred lazily must accept saved vectors of any size.
        u = state_dict.get(prefix + "u")
        if not self.is_matrix and u is not None and u.shape != self.u.shape:
            v = state_dict[prefix + "v"]
            self.input_size = tuple(v.shape[-2:])
            self._buffers["u"] = torch.empty_like(u)
            self._buffers["v"] = torch.empty_like(v)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the operator ----------------------------------------------------------
    def _op(self, v, w):
        if self.is_matrix:
            return w.flatten(1) @ v
        return F.conv2d(v, w, stride=self.stride, padding=self.padding)

    def _op_t(self, u, w):
        if self.is_matrix:
            return w.flatten(1).t() @ u
        # output_padding restores the rows/columns that a strided conv skips.
        h, wd = self.input_size
        ho, wo = u.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        op = (h + 2 * ph - kh - (ho - 1) * sh, wd + 2 * pw - kw - (wo - 1) * sw)
        return F.conv_transpose2d(u, w, stride=self.stride, padding=self.padding, output_padding=op)

    def _sigma(self, w):
        return (self.u * self._op(self.v, w)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_matrix:
            size = tuple(x.shape[-2:])
            if self.input_size is None:
                self._init_operator(size)
            elif size != self.input_size:
                raise ValueError(f"LipschitzConv2d was normalised for inputs of size {self.input_size}, "
                                 f"got {size}: its operator norm depends on the input size")
        self._maybe_iterate()
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, coeff={self.coeff}, n_iterations={self.n_iterations}, "
                f"input_size={self.input_size}")


LIPSCHITZ_LAYERS = (LipschitzLinear, LipschitzConv2d)


def update_lipschitz(module: nn.Module, n_iterations: int | None = None, tol: float | None = None) -> int:
    """Run power iterations on every spectrally normalised layer inside ``module``.

    Called by the tasks after each optimiser step (and before evaluation), so
    the vectors track the weights. A convolution whose input size is not known
    yet (before its first forward) is skipped. Returns the largest number of
    iterations a layer ran.
    """
    most = 0
    for m in module.modules():
        if isinstance(m, LipschitzConv2d) and not m.is_matrix and m.input_size is None:
            continue
        if isinstance(m, LIPSCHITZ_LAYERS):
            most = max(most, m.power_iteration(n_iterations, tol=tol))
    return most
