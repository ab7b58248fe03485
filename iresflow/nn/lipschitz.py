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

Power iteration estimates ``sigma`` from below and lags weights that move, so how the
vectors are kept up with the weights (the *upkeep*) decides whether ``Lip <= c`` holds
while training, not only after settling:

- ``upkeep="converged"`` (default): whenever the weight has changed (an optimiser step,
  a loaded checkpoint; seen through the tensor's version counter), the top singular pair
  is recomputed in float64: exactly for a matrix with a side of at most 96, else by
  Lanczos warm-started from the vectors, to the relative residual ``upkeep_tol``
  (:mod:`iresflow.nn.spectral_norm`). :func:`keep_up_lipschitz`, which the tasks call right
  after every optimiser step (dense maps of one shape together), does it there (so a
  checkpoint holds vectors that belong to its weights); a training forward does it itself
  if nobody did (a plain PyTorch loop in one process; under DDP the tasks' upkeep runs on
  every rank).
  After any step, the map the next forward applies has norm ``c`` to the tolerance.
- ``upkeep="power_iteration"``: the papers' scheme, kept for ablations: ``n_iterations``
  fixed iterations at every training forward, plus the task's ``lipschitz_iterations``
  after each step; the applied map can exceed ``c`` while the weights move fast.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from iresflow.nn.conv_bound import conv_operator_bound
from iresflow.nn.conv_ops import conv_forward, conv_input_grad, conv_strategy, conv_weight_grad
from iresflow.nn.spectral_norm import UPKEEPS, _normalize, _SpectralNorm, converge_matrices, paused_power_iteration

__all__ = ["LipschitzLinear", "LipschitzConv2d", "LIPSCHITZ_LAYERS", "UPKEEPS", "keep_up_lipschitz", "update_lipschitz",
           "paused_power_iteration"]


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
                 n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200,
                 upkeep: str = "converged", upkeep_tol: float = 1e-5):
        super().__init__(in_features, out_features, bias=bias)
        self._init_spectral(coeff, n_iterations, tol, max_iterations, upkeep, upkeep_tol)
        self.register_buffer("u", _normalize(torch.randn(out_features)))
        self.register_buffer("v", _normalize(torch.randn(in_features)))
        self.register_buffer("sigma", torch.zeros(()))
        # Start at the true norm, so that the first steps are already constrained.
        self._converge_at_start()

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
        return F.linear(x, self.weight_for(x), self.bias)

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
                 n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200,
                 upkeep: str = "converged", upkeep_tol: float = 1e-5):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        if self.groups != 1 or self.dilation != (1, 1) or isinstance(self.padding, str):
            raise ValueError("LipschitzConv2d supports groups=1, dilation=1 and integer padding")
        self._init_spectral(coeff, n_iterations, tol, max_iterations, upkeep, upkeep_tol)
        self.is_matrix = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        self.conv_strategy = conv_strategy(self)
        self.register_buffer("sigma", torch.zeros(()))
        self.input_size: tuple[int, int] | None = None
        if self.is_matrix:
            self._set_vectors(torch.randn(in_channels), torch.randn(out_channels))
            self._converge_at_start()  # (like the dense and k x k layers: never the raw weight)
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
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Vectors created lazily (first forward) are new tensors that DDP's buffer
            # broadcast does not know: start every rank from rank 0's; the iterations
            # that follow are deterministic on the same weights, so the ranks stay equal.
            for t in (self.u, self.v):
                dist.broadcast(t, src=0)
        self._converge_at_start()

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
    def _is_matrix_op(self) -> bool:
        return self.is_matrix

    def _op(self, v, w):
        if self.is_matrix:
            return w.flatten(1) @ v
        return conv_forward(self.conv_strategy, self, v, w)

    def _op_t(self, u, w):
        if self.is_matrix:
            return w.flatten(1).t() @ u
        # output_padding restores the rows/columns that a strided conv skips.
        h, wd = self.input_size
        ho, wo = u.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        op = (h + 2 * ph - kh - (ho - 1) * sh, wd + 2 * pw - kw - (wo - 1) * sw)
        return conv_input_grad(self.conv_strategy, self, u, w, op)

    def _sigma(self, w):
        return (self.u * self._op(self.v, w)).sum()

    def _dsigma(self, w):
        if self.is_matrix:
            return torch.outer(self.u, self.v).view_as(w)
        return conv_weight_grad(self.conv_strategy, self, self.u, self.v, w)

    def lipschitz_constant(self) -> float:
        """The applied map's operator norm, never below it: the exact matrix norm for a 1x1 convolution;
        for a k x k one the exact norm of the materialised operator when it is small, else the norm of
        the circular convolution on the padded grid, a certified upper bound (:mod:`iresflow.nn.conv_bound`).
        NaN before the first forward of a layer that learns its input size (nothing applied yet)."""
        with torch.no_grad():
            weight = self.normalized_weight()
            if self.is_matrix:
                return float(torch.linalg.matrix_norm(weight.flatten(1).double(), ord=2))
            if self.input_size is None:
                return math.nan
            return conv_operator_bound(weight, self.input_size, self.stride, self.padding)

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_matrix:
            size = tuple(x.shape[-2:])
            if self.input_size is None:
                self._init_operator(size)
            elif size != self.input_size:
                raise ValueError(f"LipschitzConv2d was normalised for inputs of size {self.input_size}, "
                                 f"got {size}: its operator norm depends on the input size")
        return super().weight_for(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_for(x), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, coeff={self.coeff}, n_iterations={self.n_iterations}, "
                f"input_size={self.input_size}")


LIPSCHITZ_LAYERS = (LipschitzLinear, LipschitzConv2d)


def _layers(module: nn.Module):
    """The normalised layers of ``module`` that can iterate (a convolution whose input size is not
    known yet, before its first forward, cannot)."""
    for m in module.modules():
        if isinstance(m, LipschitzConv2d) and not m.is_matrix and m.input_size is None:
            continue
        if isinstance(m, LIPSCHITZ_LAYERS):
            yield m


def keep_up_lipschitz(module: nn.Module, n_iterations: int | None = None) -> int:
    """The upkeep of every normalised layer of ``module`` after its weights changed: each converges its
    vectors (``upkeep="converged"``) or runs ``n_iterations`` power iterations (``"power_iteration"``).
    The tasks call it right after every optimiser step and before evaluations. Returns the largest
    number of iterations a layer ran."""
    layers = list(_layers(module))
    # Dense maps of one shape converge together: one batched Lanczos run (iresflow.nn.spectral_norm).
    stacks: dict[tuple, list] = defaultdict(list)
    for m in layers:
        if m.converges and m._is_matrix_op():
            w = m.weight
            stacks[(w.shape[0], w[0].numel(), w.device, w.dtype, m.upkeep_tol, m.max_iterations)].append(m)
    done = [converge_matrices(stack) for stack in stacks.values()]
    done += [m.keep_up(n_iterations) for m in layers if not (m.converges and m._is_matrix_op())]
    return max(done, default=0)


def update_lipschitz(module: nn.Module, n_iterations: int | None = None, tol: float | None = None) -> int:
    """Run power iterations on every spectrally normalised layer inside ``module`` (``n_iterations``,
    or until the estimate converges to ``tol``), whatever their upkeep. Returns the largest number of
    iterations a layer ran."""
    return max((m.power_iteration(n_iterations, tol=tol) for m in _layers(module)), default=0)
